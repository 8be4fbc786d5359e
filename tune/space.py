"""Search spaces: YAML bounds -> a define-by-run function for OptunaSearch; trial config -> QuantConfig.

A space is a mapping of parameter -> spec::

    w_bits: [2, 8]                 # integer range (inclusive)
    a_bits: [4, 8]
    qat_lr: {low: 1e-4, high: 0.1, log: true}
    qat_epochs: [1, 3]
    kd_weight: [0, 0.9]            # distillation from the FP32 baseline (fine-tuning trials only)
    size_budget_mb: [0.2, 0.5]     # per-layer weight bits allocated by sensitivity within a sampled budget
    method: [ptq, qat, lsq]        # a list of strings = categorical
    granularity: [per_channel, per_tensor]
    block_w_bits: [2, 8]           # mixed precision: one weight bit-width per inverted-residual block

A fixed value (``method: qat``) is a constant. Unknown keys, empty spaces and bits outside 2..8 are
errors (SpaceError), raised before Ray starts.
"""
from __future__ import annotations

from typing import Any

from quantization import Granularity, Method, QuantConfig
from trainer.model import STAGES

NUM_BLOCKS = sum(n for _, _, n, _ in STAGES)  # inverted-residual blocks: blocks.0 .. blocks.16
INT_KEYS = {"w_bits", "a_bits", "qat_epochs", "block_w_bits"}
FLOAT_KEYS = {"qat_lr", "kd_weight", "size_budget_mb"}
FINE_TUNE_KEYS = ("qat_lr", "qat_epochs", "kd_weight")  # sampled only for trials whose method fine-tunes
CAT_KEYS = {"method": tuple(Method), "granularity": tuple(Granularity)}
KNOWN = INT_KEYS | FLOAT_KEYS | set(CAT_KEYS)
BLOCK_PREFIX = "w_bits_b"  # mixed precision: one sampled weight bit-width per block, w_bits_b00 .. w_bits_b16


def block_key(i: int) -> str:
    return f"{BLOCK_PREFIX}{i:02d}"


def block_bits(config: dict[str, Any]) -> dict[int, int]:
    """The per-block weight bit-widths a trial sampled ({} for a uniform trial), by block index."""
    return {int(k[len(BLOCK_PREFIX):]): v for k, v in sorted(config.items()) if k.startswith(BLOCK_PREFIX)}


class SpaceError(ValueError):
    pass


def num_range(key: str, spec: Any) -> tuple[float, float, bool]:
    """(low, high, log) of a numeric search parameter given as {low, high, log}, [low, high] or one value."""
    if isinstance(spec, dict):
        lo, hi, log = spec.get("low"), spec.get("high"), bool(spec.get("log", key == "qat_lr"))
    elif isinstance(spec, (list, tuple)) and len(spec) == 2:
        (lo, hi), log = spec, key == "qat_lr"
    else:
        lo = hi = spec
        log = False
    try:
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise SpaceError(f"space.{key}={spec!r} is invalid: give [low, high] numbers") from None
    if lo > hi:
        raise SpaceError(f"space.{key}={spec!r} is empty: low > high")
    return lo, hi, log


def validate_space(space: dict[str, Any]) -> dict[str, Any]:
    """Check bounds; return the normalised space."""
    if not isinstance(space, dict) or not space:
        raise SpaceError("the search space is empty: give at least one of " + ", ".join(sorted(KNOWN)))
    out: dict[str, Any] = {}
    for key, spec in space.items():
        if key not in KNOWN:
            raise SpaceError(f"unknown search parameter {key!r}; allowed: {', '.join(sorted(KNOWN))}")
        if key in CAT_KEYS:
            vals = [spec] if isinstance(spec, str) else list(spec or [])
            if not vals:
                raise SpaceError(f"space.{key} is empty: allowed values {', '.join(CAT_KEYS[key])}")
            typ = {"method": Method, "granularity": Granularity}[key]
            try:
                out[key] = [str(typ.parse(f"space.{key}", v)) for v in vals]
            except ValueError as e:
                raise SpaceError(str(e)) from None
            continue
        lo, hi, log = num_range(key, spec)
        if key in INT_KEYS:
            if not (lo.is_integer() and hi.is_integer()):
                raise SpaceError(f"space.{key}={spec!r} is invalid: integers expected")
            if key.endswith("bits") and not (2 <= lo and hi <= 8):
                raise SpaceError(f"space.{key}={spec!r} is out of range: bits must lie in 2..8")
            if key == "qat_epochs" and lo < 1:
                raise SpaceError(f"space.qat_epochs={spec!r} is invalid: at least 1")
            out[key] = (int(lo), int(hi))
        elif key == "kd_weight":
            if not (0 <= lo and hi <= 1) or log:
                raise SpaceError(f"space.kd_weight={spec!r} is invalid: a linear range within [0, 1]")
            out[key] = {"low": lo, "high": hi, "log": False}
        else:
            if lo <= 0:
                raise SpaceError(f"space.{key}={spec!r} is invalid: must be > 0")
            out[key] = {"low": lo, "high": hi, "log": log}
    return out


class DefineByRun:
    """Picklable define-by-run space for OptunaSearch (the study is saved with the experiment)."""

    def __init__(self, space: dict[str, Any]):
        self.space = validate_space(space)

    def __call__(self, trial) -> dict[str, Any] | None:
        s = self.space
        # conditional space: QAT hyper-parameters exist only for trials that fine-tune
        method = Method(trial.suggest_categorical("method", s["method"]) if "method" in s else Method.PTQ)
        for key, spec in s.items():
            if key == "method" or (key in FINE_TUNE_KEYS and not method.fine_tunes):
                continue
            if key == "block_w_bits":
                for i in range(NUM_BLOCKS):
                    trial.suggest_int(block_key(i), spec[0], spec[1])
            elif key in CAT_KEYS:
                trial.suggest_categorical(key, spec)
            elif key in INT_KEYS:
                trial.suggest_int(key, spec[0], spec[1])
            else:
                trial.suggest_float(key, spec["low"], spec["high"], log=spec["log"])
        return None


def smallest_bits(space: dict[str, Any]) -> dict[str, Any]:
    """The configuration of the smallest model the space allows (for the size-budget check)."""
    s = validate_space(space)
    out: dict[str, Any] = {}
    if "w_bits" in s:
        out["w_bits"] = s["w_bits"][0]
    if "a_bits" in s:
        out["a_bits"] = s["a_bits"][0]
    if "block_w_bits" in s:
        out.update({block_key(i): s["block_w_bits"][0] for i in range(NUM_BLOCKS)})
    if "granularity" in s and Granularity.PER_TENSOR in s["granularity"]:
        out["granularity"] = str(Granularity.PER_TENSOR)
    return out


def quant_config(trial_cfg: dict[str, Any], base: dict[str, Any]) -> QuantConfig:
    """Map a trial's config (flat keys) onto a QuantConfig; ``base`` holds the fixed settings."""
    d = dict(base)
    for k in ("w_bits", "a_bits", "method"):
        if k in trial_cfg:
            d[k] = trial_cfg[k]
    if "granularity" in trial_cfg:
        d["w_granularity"] = trial_cfg["granularity"]
    blocks = block_bits(trial_cfg)
    if blocks:
        d["overrides"] = list(d.get("overrides", [])) + [{"pattern": f"blocks.{i}.*", "w_bits": b}
                                                         for i, b in blocks.items()]
    return QuantConfig.from_dict(d)


def trial_hparams(config: dict[str, Any], settings) -> dict[str, Any]:
    """The fine-tuning a trial does: ``qat_epochs``, ``qat_lr`` and ``kd_weight`` (distillation) as
    sampled, else the search's fixed values; all 0 for a method that does not fine-tune."""
    if not Method(config.get("method", settings.quant_base.get("method", Method.PTQ))).fine_tunes:
        return {"qat_epochs": 0, "qat_lr": 0.0, "kd_weight": 0.0}
    return {"qat_epochs": int(config.get("qat_epochs", settings.qat_epochs)),
            "qat_lr": float(config.get("qat_lr", settings.qat_lr)),
            "kd_weight": float(config.get("kd_weight", settings.kd_weight))}


def trial_params(config: dict[str, Any], settings=None) -> dict[str, Any]:
    """A trial's parameters for tables and MLflow: the sampled keys, plus the QAT settings that the
    search fixed (rather than sampled) for trials that fine-tune. (``_s`` is how experiments of older
    versions carried their settings inside each trial's config.)"""
    params = {k: v for k, v in config.items() if k != "_s"}
    fixed = settings.to_dict() if settings is not None else config.get("_s", {})
    if Method(params.get("method", Method.PTQ)).fine_tunes:
        params.setdefault("qat_lr", fixed.get("qat_lr"))
        params.setdefault("qat_epochs", fixed.get("qat_epochs"))
        if fixed.get("kd_weight"):
            params.setdefault("kd_weight", fixed.get("kd_weight"))
    return params


def run_params(config: dict[str, Any], settings) -> dict[str, Any]:
    """A trial's MLflow params: the same keys, numeric where they can be, for every trial of a search,
    so that a parallel-coordinates plot has no gaps: qat_lr and qat_epochs are 0 for a method that does
    not fine-tune, a_bits / method / granularity are filled from the search's fixed settings, and a
    mixed-precision trial's w_bits is the mean of its block bit-widths (the blocks are params too)."""
    base = settings.quant_base
    p = trial_params(config, settings)
    p.update(trial_hparams(p, settings))
    p.setdefault("method", str(base.get("method", Method.PTQ)))
    p.setdefault("a_bits", base.get("a_bits", 8))
    p.setdefault("granularity", str(base.get("w_granularity", "per_channel")))
    blocks = block_bits(p)
    if "size_budget_mb" not in p:  # an allocated trial's bits are its avg_w_bits metric and bits.<layer> params
        p["w_bits"] = round(sum(blocks.values()) / len(blocks), 2) if blocks else p.get("w_bits", base.get("w_bits", 8))
    return p


def trial_label(params: dict[str, Any]) -> str:
    """What a trial is, in a few characters (its MLflow run name): ``W5A6 qat lr=0.037``,
    ``W4-8A8 ptq`` for a mixed-precision trial (lowest-highest block bits)."""
    blocks = block_bits(params)
    w = f"{min(blocks.values())}-{max(blocks.values())}" if blocks else params.get("w_bits", "?")
    method = str(params.get("method", Method.PTQ))
    label = f"W{w}A{params.get('a_bits', 8)} {method}"
    if "size_budget_mb" in params:
        label = f"alloc {float(params['size_budget_mb']):.3g}MB A{params.get('a_bits', 8)} {method}"
    if Method(method).fine_tunes and params.get("qat_lr") is not None:
        label += f" lr={float(params['qat_lr']):.2g}"
    if Method(method).fine_tunes and params.get("kd_weight"):
        label += f" kd={float(params['kd_weight']):.2g}"
    return label
