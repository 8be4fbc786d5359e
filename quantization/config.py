"""QuantConfig: what to quantize, how, and where the exceptions are. Frozen; to/from dict. Imports no
torch, so the command line can offer these choices without loading it.

Bit-widths are 2..8, or 32 for "keep this tensor in FP32". Layer patterns are shell globs over the
model's layer names (``stem.conv``, ``blocks.3.*``, ``blocks.*.dw.conv``, ``classifier``; see
trainer/model.py), or ``@first`` / ``@last``: the first and the last quantizable layer the input reaches
(the first conv and the classifier of a CNN, whatever their names). Resolution for each quantizable
layer, later rules winning:

  1. the global ``w_bits`` / ``a_bits``;
  2. ``keep_fp32`` patterns: weights and input activations stay FP32;
  3. ``overrides`` in order: each sets ``w_bits`` and/or ``a_bits`` (and optionally the weight
     granularity) for the layers its pattern matches (so an override can also quantize a layer
     that ``keep_fp32`` named, e.g. an 8-bit first conv).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, Iterable

FP32 = 32
FIRST, LAST = "@first", "@last"  # layer patterns: the first / last quantizable layer in execution order
OBSERVERS = ("minmax", "ema", "percentile", "mse")  # range observers (quantization/observers.py)


# Settings that only steer how the quantized weights are reached (fine-tuning, PTQ's BN re-estimation) and
# were added after the packed format: left out of packed-file headers and sensitivity cache keys (the
# sensitivity tables do not use them), so files keep their exact bytes and cached tables stay valid
LATER_PROCEDURE_FIELDS = ("bn_live_below_bits", "live_bn_lr_factor", "bn_reestimate_batches")


class QuantConfigError(ValueError):
    """A quantization setting is invalid; the message names it and what is allowed."""


class Method(StrEnum):
    """How a model is quantized. The one place that says which methods fine-tune."""
    PTQ = "ptq"   # post-training: calibrate activation ranges, no training
    QAT = "qat"   # quantization-aware fine-tuning (straight-through estimator, BN folded)
    LSQ = "lsq"   # QAT with learned step sizes (Esser et al. 2020)

    @property
    def fine_tunes(self) -> bool:
        return self is not Method.PTQ

    @classmethod
    def parse(cls, name: str, v: Any) -> "Method":
        try:
            return cls(str(v).lower())
        except ValueError:
            raise QuantConfigError(f"{name}={v!r} is invalid: allowed {', '.join(cls)}") from None


class Granularity(StrEnum):
    """Weight scales: one per output channel, or one per tensor."""
    PER_CHANNEL = "per_channel"
    PER_TENSOR = "per_tensor"

    @property
    def flag(self) -> str:
        """The spelling on the command line (per-channel)."""
        return self.value.replace("_", "-")

    @classmethod
    def parse(cls, name: str, v: Any) -> "Granularity":
        try:
            return cls(str(v).replace("-", "_"))
        except ValueError:
            raise QuantConfigError(f"{name}={v!r} is invalid: allowed {', '.join(g.flag for g in cls)}") from None


def _number(name: str, v: Any, lo: float, hi: float = math.inf, *, lo_open: bool = False, integer: bool = False):
    """``v`` as an int/float within [lo, hi] (``lo_open``: (lo, hi]), else QuantConfigError naming it."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > lo if lo_open else v >= lo) \
        and v <= hi and (not integer or float(v).is_integer())
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise QuantConfigError(f"{name}={v!r} is invalid: {kind} {bound}" + (f" and <= {hi:g}" if hi < math.inf else ""))
    return int(v) if integer else float(v)


@dataclass(frozen=True)
class FineTune:
    """How QAT / LSQ fine-tune a quantized model: epochs, learning rate, and distillation from the FP32
    baseline (loss = (1 - kd_weight) label loss + kd_weight T^2 KL at kd_temperature T). The one home of
    these defaults: `bitsearch quantize`, search settings and the pipeline read them from here."""

    epochs: int = 1            # QAT/LSQ epochs when not given
    lr: float = 0.003          # chosen on the cpu model (docs/lab/2026-12-03e-results-history.md, section 7)
    kd_weight: float = 0.0     # 0: no distillation
    kd_temperature: float = 4.0

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("epochs", _number("epochs", self.epochs, 1, integer=True))
        set_("lr", _number("lr", self.lr, 0, lo_open=True))
        set_("kd_weight", _number("kd_weight", self.kd_weight, 0, 1))
        set_("kd_temperature", _number("kd_temperature", self.kd_temperature, 0, lo_open=True))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_values(cls, values: dict[str, Any], names: dict[str, str] | None = None) -> "FineTune":
        """FineTune from the given fields (the rest keep their defaults). An error names the field as
        ``names`` spells it where the value came from (``--epochs`` on the command line, ``qat_epochs`` in
        a search)."""
        names = names or {}
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise QuantConfigError(f"unknown fine-tuning option(s) {', '.join(unknown)}; allowed: "
                                   + ", ".join(names.get(f.name, f.name) for f in fields(cls)))
        try:
            return cls(**values)
        except QuantConfigError as e:
            field, _, rest = str(e).partition("=")
            raise QuantConfigError(f"{names.get(field, field)}={rest}") from None


def _check_bits(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise QuantConfigError(f"{name}={v!r} is invalid: allowed 2..8, or 32 for FP32")
    try:
        f = float(v)
    except ValueError:
        raise QuantConfigError(f"{name}={v!r} is not a number: allowed 2..8, or 32 for FP32") from None
    if not f.is_integer() or not (2 <= f <= 8 or f == FP32):
        raise QuantConfigError(f"{name}={v!r} is out of range: allowed 2..8, or 32 for FP32")
    return int(f)


@dataclass(frozen=True)
class LayerOverride:
    pattern: str
    w_bits: int | None = None        # None: inherit
    a_bits: int | None = None
    w_granularity: str | None = None

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern:
            raise QuantConfigError(f"override pattern {self.pattern!r} is invalid: a layer-name glob such as blocks.3.*")
        if self.w_bits is not None:
            object.__setattr__(self, "w_bits", _check_bits(f"overrides[{self.pattern}].w_bits", self.w_bits))
        if self.a_bits is not None:
            object.__setattr__(self, "a_bits", _check_bits(f"overrides[{self.pattern}].a_bits", self.a_bits))
        if self.w_granularity is not None:
            object.__setattr__(self, "w_granularity", Granularity.parse(f"overrides[{self.pattern}].w_granularity",
                                                                        self.w_granularity))


@dataclass(frozen=True)
class LayerPlan:
    """The resolved settings of one layer."""
    w_bits: int
    a_bits: int
    w_granularity: Granularity

    @property
    def quantized(self) -> bool:
        return self.w_bits != FP32 or self.a_bits != FP32


@dataclass(frozen=True)
class QuantConfig:
    w_bits: int = 8
    a_bits: int = 8
    w_symmetric: bool = True
    a_symmetric: bool = False
    w_granularity: Granularity = Granularity.PER_CHANNEL    # activations: always one scale per tensor
    w_observer: str = "minmax"
    a_observer: str = "minmax"
    percentile: float = 99.99
    method: Method = Method.PTQ
    keep_fp32: tuple[str, ...] = ("@first", "@last")          # the first conv and the classifier
    overrides: tuple[LayerOverride, ...] = ()
    calib_batches: int = 8
    # PTQ: after calibration, re-estimate the BN running statistics of the quantized model (its quantized
    # weights and activations) over this many augmented training batches (crop + flip, the data BN trains
    # on); 0 keeps the FP32 model's. Quantized weights shift the channels' means and variances away from
    # the FP32 statistics; re-estimated ones follow them. Augmented batches because BN trained on those:
    # un-augmented statistics do not match what the model learned (the measurements: docs/lab/
    # 2026-12-03e-results-history.md, section 7)
    bn_reestimate_batches: int = 16
    # QAT: BN running statistics update until this epoch. 0 (frozen from the start): short fine-tuning with
    # live BN statistics moved them away from what the folded weights need (measured: the history page,
    # section 7); longer QAT runs may set 2-3 to let BN adapt first
    freeze_bn_epoch: int = 0
    # QAT: layers whose weights have fewer bits keep BN live through the whole fine-tuning (re-estimated
    # at its end) whatever freeze_bn_epoch says; 0 = none. At 2 bits the weights move too far for the FP32
    # statistics to stay valid (measured: the history page, section 7)
    bn_live_below_bits: int = 4
    # QAT: the layers that keep BN live for that reason train at this multiple of the QAT learning rate (their
    # weights act through batch-normalised outputs, unlike the frozen layers' folded conv). 1 (default) = one
    # learning rate for every layer. Layers with live BN tolerate (and at 2 bits want) a larger rate than
    # frozen ones, so a mixed allocation may want ~3; not the default: a search that samples the learning
    # rate would push its 2-bit layers past where they diverge
    live_bn_lr_factor: float = 1.0
    freeze_observer_epoch: int = 0           # QAT: activation ranges (EMA) update until this epoch
    # also quantize what an integer runtime keeps on a grid beyond layer inputs: both inputs of each residual add
    # (the block's input once, for branch and skip; the branch's output) and the input of pooling; biases sit
    # on the int32 grid of input scale x weight scale. Then the ONNX export runs as integer kernels. Packed files
    # written before this setting existed hold models without it (packing.read_config)
    quantize_outputs: bool = True

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("w_bits", _check_bits("w_bits", self.w_bits))
        set_("a_bits", _check_bits("a_bits", self.a_bits))
        set_("w_granularity", Granularity.parse("w_granularity", self.w_granularity))
        set_("method", Method.parse("method", self.method))
        for k in ("w_observer", "a_observer"):
            if getattr(self, k) not in OBSERVERS:
                raise QuantConfigError(f"{k}={getattr(self, k)!r} is invalid: allowed {', '.join(OBSERVERS)}")
        for k in ("w_symmetric", "a_symmetric", "quantize_outputs"):
            if not isinstance(getattr(self, k), bool):
                raise QuantConfigError(f"{k}={getattr(self, k)!r} is invalid: true or false")
        for k, lo in (("calib_batches", 1), ("freeze_bn_epoch", 0), ("freeze_observer_epoch", 0),
                      ("bn_live_below_bits", 0), ("bn_reestimate_batches", 0)):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise QuantConfigError(f"{k}={v!r} is invalid: an integer >= {lo}")
        f = self.live_bn_lr_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
            raise QuantConfigError(f"live_bn_lr_factor={f!r} is invalid: a number > 0 (1 = the QAT learning rate)")
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 50 < p <= 100:
            raise QuantConfigError(f"percentile={p!r} is invalid: allowed (50, 100]")
        keep = (self.keep_fp32,) if isinstance(self.keep_fp32, str) else self.keep_fp32
        if not isinstance(keep, (list, tuple)) or not all(isinstance(k, str) and k for k in keep):
            raise QuantConfigError(f"keep_fp32={self.keep_fp32!r} is invalid: a list of layer-name globs such as "
                                   "[stem.conv, classifier]")
        set_("keep_fp32", tuple(keep))
        if isinstance(self.overrides, (str, dict)) or not isinstance(self.overrides, (list, tuple)):
            raise QuantConfigError(f"overrides={self.overrides!r} is invalid: a list of mappings such as "
                                   "[{pattern: blocks.3.*, w_bits: 4}]")
        ovs = []
        for i, o in enumerate(self.overrides):
            if isinstance(o, dict):
                unknown = set(o) - {f.name for f in fields(LayerOverride)}
                if unknown:
                    raise QuantConfigError(f"override {o!r} has unknown key(s) {', '.join(sorted(unknown))}; "
                                           "allowed: pattern, w_bits, a_bits, w_granularity")
                if "pattern" not in o:
                    raise QuantConfigError(f"override {o!r} has no pattern")
                o = LayerOverride(**o)
            elif not isinstance(o, LayerOverride):
                raise QuantConfigError(f"overrides[{i}]={o!r} is invalid: a mapping such as "
                                       "{pattern: blocks.3.*, w_bits: 4}")
            ovs.append(o)
        set_("overrides", tuple(ovs))

    # ---------------------------------------------------------------------------------------------
    def to_dict(self, procedure: bool = True) -> dict[str, Any]:
        """JSON-able fields. ``procedure=False`` leaves out LATER_PROCEDURE_FIELDS (packed headers,
        sensitivity cache keys)."""
        d = dataclasses.asdict(self)
        if not procedure:
            for k in LATER_PROCEDURE_FIELDS:
                d.pop(k)
        d["method"], d["w_granularity"] = str(self.method), str(self.w_granularity)
        d["keep_fp32"] = list(self.keep_fp32)
        d["overrides"] = [{k: str(v) if isinstance(v, Granularity) else v for k, v in dataclasses.asdict(o).items()
                           if v is not None} for o in self.overrides]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        if not isinstance(d, dict):
            raise QuantConfigError(f"quantization config must be a mapping, got {type(d).__name__}")
        if "a_granularity" in d:  # older configs named the only choice there is
            d = dict(d)
            v = d.pop("a_granularity")
            if str(v).replace("-", "_") != "per_tensor":
                raise QuantConfigError(f"a_granularity={v!r} is invalid: activations have no fixed channel set to "
                                       "scale (one scale per tensor); allowed: per-tensor")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise QuantConfigError(f"unknown quantization option(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
        out = {}
        for k, v in d.items():
            default = getattr(cls, k) if k not in ("keep_fp32", "overrides") else None
            if isinstance(default, bool):
                if isinstance(v, str) and v.lower() in ("true", "false"):
                    v = v.lower() == "true"
            elif isinstance(default, int) and k not in ("w_bits", "a_bits"):
                if isinstance(v, str):
                    try:
                        v = int(v)
                    except ValueError:
                        raise QuantConfigError(f"{k}={v!r} is not an integer") from None
            elif isinstance(default, float) and isinstance(v, (str, int)) and not isinstance(v, bool):
                try:
                    v = float(v)
                except ValueError:
                    raise QuantConfigError(f"{k}={v!r} is not a number") from None
            out[k] = v
        return cls(**out)

    def replace(self, **kw) -> "QuantConfig":
        return QuantConfig.from_dict({**self.to_dict(), **kw})

    # ---------------------------------------------------------------------------------------------
    def plan(self, layer_names: Iterable[str], other_names: Iterable[str] = ()) -> dict[str, LayerPlan]:
        """Resolve every quantizable layer's settings. A pattern that matches no quantizable layer is an
        error (it names what it matched instead, if anything)."""
        names = list(layer_names)
        ends = {FIRST: names[:1], LAST: names[-1:]}

        def match(n: str, pat: str) -> bool:
            return n in ends[pat] if pat in ends else fnmatch.fnmatchcase(n, pat)
        for pat in [*self.keep_fp32, *(o.pattern for o in self.overrides)]:
            if not any(match(n, pat) for n in names):
                hit = [n for n in other_names if fnmatch.fnmatchcase(n, pat)]
                why = (f"it matches only {hit[0]}, which has no weight channels to quantize (BN/activation/pool)"
                       if hit else "it matches no layer")
                raise QuantConfigError(f"layer pattern {pat!r} is invalid: {why}; quantizable layers look like "
                                       f"{', '.join(names[:2])}, ..., {names[-1]}")
        out = {}
        for n in names:
            w, a, g = self.w_bits, self.a_bits, self.w_granularity
            if any(match(n, p) for p in self.keep_fp32):
                w = a = FP32
            for o in self.overrides:
                if match(n, o.pattern):
                    w = o.w_bits if o.w_bits is not None else w
                    a = o.a_bits if o.a_bits is not None else a
                    g = o.w_granularity or g
            out[n] = LayerPlan(w, a, g)
        return out
