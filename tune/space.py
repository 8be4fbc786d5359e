"""Search spaces: YAML bounds -> a define-by-run function for OptunaSearch (a trial's sampled config
becomes its settings in tune/trial_spec.py).

A space is a mapping of parameter -> spec::

    w_bits: [2, 8]                 # integer range (inclusive)
    a_bits: [4, 8]
    qat_lr: {low: 1e-4, high: 0.1, log: true}
    qat_epochs: [1, 3]
    kd_weight: [0, 0.9]            # distillation from the FP32 baseline (fine-tuning trials only)
    size_budget_mb: [0.2, 0.5]     # per-layer weight bits allocated by sensitivity within a sampled budget
    method: [ptq, qat, lsq]        # a list of strings = categorical
    granularity: [per_channel, per_tensor]
    block_w_bits: [2, 8]           # mixed precision: one weight bit-width per block of the model
                                   # (quantization.api.layer_blocks: MobileNet-v2's 17, ResNet-20's 9)

A fixed value (``method: qat``) is a constant. Unknown keys, empty spaces and bits outside 2..8 are
errors (SpaceError), raised before Ray starts.
"""
from __future__ import annotations

from typing import Any

from quantization import Granularity, Method
from tune.trial_spec import FINE_TUNE_KEYS, block_key

LEGACY_BLOCKS = 17  # studies saved before the blocks came from the model searched MobileNet-v2's 17
INT_KEYS = {"w_bits", "a_bits", "qat_epochs", "block_w_bits"}
FLOAT_KEYS = {"qat_lr", "kd_weight", "size_budget_mb"}
CAT_KEYS = {"method": tuple(Method), "granularity": tuple(Granularity)}
KNOWN = INT_KEYS | FLOAT_KEYS | set(CAT_KEYS)


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
    """Picklable define-by-run space for OptunaSearch (the study is saved with the experiment).
    ``method``: the search's fixed method, for a space that does not sample one; ``num_blocks``: how many
    blocks ``block_w_bits`` samples a bit-width for (len(SearchSettings.blocks))."""

    def __init__(self, space: dict[str, Any], method: Method | str = Method.PTQ, num_blocks: int = 0):
        self.space = validate_space(space)
        self.method = Method(method)
        if "block_w_bits" in self.space and num_blocks < 1:
            raise SpaceError("space.block_w_bits needs the model's blocks (none were found)")
        self.num_blocks = num_blocks

    def __setstate__(self, state):  # studies saved before ``method`` / ``num_blocks`` existed
        self.__dict__.update({"method": Method.PTQ, "num_blocks": LEGACY_BLOCKS, **state})

    def __call__(self, trial) -> dict[str, Any] | None:
        s = self.space
        # conditional space: QAT hyper-parameters exist only for trials that fine-tune
        method = Method(trial.suggest_categorical("method", s["method"]) if "method" in s else self.method)
        for key, spec in s.items():
            if key == "method" or (key in FINE_TUNE_KEYS and not method.fine_tunes):
                continue
            if key == "block_w_bits":
                for i in range(self.num_blocks):
                    trial.suggest_int(block_key(i), spec[0], spec[1])
            elif key in CAT_KEYS:
                trial.suggest_categorical(key, spec)
            elif key in INT_KEYS:
                trial.suggest_int(key, spec[0], spec[1])
            else:
                trial.suggest_float(key, spec["low"], spec["high"], log=spec["log"])
        return None


def smallest_bits(space: dict[str, Any], num_blocks: int = 0) -> dict[str, Any]:
    """The configuration of the smallest model the space allows (for the size-budget check), for a model of
    ``num_blocks`` blocks."""
    s = validate_space(space)
    out: dict[str, Any] = {}
    if "w_bits" in s:
        out["w_bits"] = s["w_bits"][0]
    if "a_bits" in s:
        out["a_bits"] = s["a_bits"][0]
    if "block_w_bits" in s:
        out.update({block_key(i): s["block_w_bits"][0] for i in range(num_blocks)})
    if "granularity" in s and Granularity.PER_TENSOR in s["granularity"]:
        out["granularity"] = str(Granularity.PER_TENSOR)
    return out
