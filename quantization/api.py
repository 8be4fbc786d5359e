"""One entry point: prepare(model, config) -> calibrate / fine-tune -> pack (convert).

``prepare`` copies an FP32 model and swaps every quantizable conv (with its BN) and linear for a
fake-quant module according to the config's per-layer plan. The model says which layers
can be quantized (``model.quantizable_layers()``: see ``described_layers``); their names are the
model's module names (``blocks.3.dw.conv``, ``classifier``).
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from quantization.config import FP32, Method, QuantConfig, QuantConfigError
from quantization.graph import quantize_traced_adds
from quantization.modules import FakeQuantizer, QuantConvBn2d, QuantLinear, SharedInput, act_quantizer
from quantization.trace import traced_layers

QUANT_LAYERS = (QuantConvBn2d, QuantLinear)


class CalibrationError(ValueError):
    """Calibration could not set the activation ranges (no data)."""


def described_layers(model: nn.Module) -> list:
    """The quantizable layers of ``model``: its own description, ``model.quantizable_layers()``, a list of
    records with ``name`` (the conv/linear module), ``unit`` (its conv -> BN -> act unit, or None),
    ``bn`` (the BN folded into it, or None), ``input_relu6`` (its input is a ReLU6 output) and
    ``relu6_source`` (that ReLU6 module, when this layer is its only reader) - trainer.model.LayerInfo is
    the one MobileNet-v2 gives; quantization imports no model code - or, for any other model, what tracing
    it finds (quantization/trace.py; QuantConfigError naming what it cannot handle)."""
    describe = getattr(model, "quantizable_layers", None)
    if describe is None:
        cached = getattr(model, "_bitsearch_traced", None)
        if cached is None:
            cached = traced_layers(model)
            object.__setattr__(model, "_bitsearch_traced", cached)  # a plain attribute, not a submodule
        return list(cached)
    return list(describe())


def layer_blocks(model: nn.Module, image_size: int = 32) -> list[tuple[str, list[str]]]:
    """The blocks of a per-block mixed-precision search, found in the model's own structure: ``[(name,
    layers)]`` in execution order. A block is one child of a Sequential or ModuleList (the outermost such
    container holding the layer) that is itself a module with layers inside (MobileNet-v2's ``blocks.3``,
    ResNet's ``layers.4``); a model with fewer than two of those (a flat stack of layers) is grouped into
    stages by resolution: runs of convolutions that read the same height x width (``stage2@16x16``). Layers
    in no block (a stem, a classifier) are left out: a search gives them its uniform weight bits."""
    names = [info.name for info in described_layers(model)]
    modules = dict(model.named_modules())
    containers = (nn.Sequential, nn.ModuleList)
    units: dict[str, list[str]] = {}
    for n in names:
        parts = n.split(".")
        for k in range(1, len(parts)):
            if parts[k - 1].isdigit() and isinstance(modules[".".join(parts[:k - 1])], containers):
                units.setdefault(".".join(parts[:k]), []).append(n)
                break
    if len(units) >= 2:
        return list(units.items())
    sizes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module, args) -> None:
            sizes.setdefault(name, tuple(args[0].shape[2:]))
        return hook
    hooks = [modules[n].register_forward_pre_hook(record(n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    stages: list[tuple[str, list[str]]] = []
    last = None
    for n in names:
        hw = sizes.get(n, ())
        if len(hw) != 2:  # a Linear: no resolution, in no stage
            continue
        if hw != last:
            stages.append((f"stage{len(stages)}@{hw[0]}x{hw[1]}", []))
            last = hw
        stages[-1][1].append(n)
    return stages


def _nonneg(info) -> bool:
    """Whether a layer's input is never negative (ReLU or ReLU6 before it): an unsigned activation grid."""
    return bool(info.input_relu6 or getattr(info, "input_nonneg", False))


def _fuse_relu6(model: nn.Module, src: str | None, q: FakeQuantizer | None) -> None:
    """Let the (unsigned, per-tensor) quantizer ``q`` apply the ReLU6 module ``src`` whose output only it
    reads, and drop that module: same values, one full-size pass fewer each way."""
    if src is None or q is None or q.signed or q.axis is not None:
        return
    parent_name, _, attr = src.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(getattr(parent, attr, None), nn.ReLU6):
        setattr(parent, attr, nn.Identity())
        q.fused_relu6 = True


def plan_for(model: nn.Module, cfg: QuantConfig) -> dict:
    """Each quantizable layer's resolved settings; QuantConfigError for a layer pattern that matches
    nothing in ``model`` (cheap: check a config against a model before any work)."""
    layers = [i.name for i in described_layers(model)]
    others = [n for n, _ in model.named_modules() if n and n not in layers]
    return cfg.plan(layers, others)


def bits_label(layers: Iterable) -> str:
    """The bit-widths of quantized layers in a few characters: ``W4A8``, or ``W2-8A8`` when their weight
    bits differ (lowest-highest; activations likewise; FP32 left out, ``W32A32`` if nothing is quantized).
    ``layers``: anything with ``w_bits`` and ``a_bits``, a plan's values (``plan_for``) or a model's quant
    layers (``quant_layers``). What a run is called where a config's own ``w_bits`` would hide per-layer
    overrides.

    >>> from quantization.config import LayerPlan, Granularity
    >>> g = Granularity.PER_CHANNEL
    >>> bits_label([LayerPlan(2, 8, g), LayerPlan(6, 8, g), LayerPlan(32, 32, g)])
    'W2-6A8'
    """
    s = bits_summary(layers)
    return f"W{s['w_bits']}A{s['a_bits']}"


def bits_summary(layers: Iterable) -> dict[str, Any]:
    """What a file's JSON says of its bits: ``w_bits`` / ``a_bits`` an int when every quantized layer has the
    same, else the range ``"lo-hi"`` (FP32 layers left out; 32 when nothing is quantized), and ``bits``
    the label (``W2-8A8``)."""
    layers = list(layers)

    def span(values) -> int | str:
        v = sorted({b for b in values if b != FP32})
        return FP32 if not v else v[0] if len(v) == 1 else f"{v[0]}-{v[-1]}"
    w, a = span(x.w_bits for x in layers), span(x.a_bits for x in layers)
    return {"bits": f"W{w}A{a}", "w_bits": w, "a_bits": a}


def prepare(model: nn.Module, cfg: QuantConfig, traced_adds: bool = True) -> nn.Module:
    """A fake-quant copy of ``model`` (the original is untouched). Unknown layer patterns in ``cfg``
    raise QuantConfigError. Weights are quantized at once; activations after ``calibrate``.
    ``traced_adds=False``: a model that does not describe its layers keeps FP32 residual adds even with
    ``cfg.quantize_outputs`` (packed files of format version 2 hold such models)."""
    q = copy.deepcopy(model)
    plan = plan_for(q, cfg)
    for info in described_layers(q):
        p = plan[info.name]
        if not p.quantized:
            continue
        layer = q.get_submodule(info.name)
        parent_name, _, attr = info.name.rpartition(".")
        parent = q.get_submodule(parent_name) if parent_name else q
        if isinstance(layer, nn.Conv2d):
            bn = q.get_submodule(info.bn) if info.bn else None
            qm = QuantConvBn2d(layer, bn, p, cfg, input_relu6=info.input_relu6, input_nonneg=_nonneg(info))
            if bn is not None:  # folded into the conv: the unit's BN slot becomes a pass-through
                bn_parent, _, bn_attr = info.bn.rpartition(".")
                setattr(q.get_submodule(bn_parent) if bn_parent else q, bn_attr, nn.Identity())
        elif isinstance(layer, nn.Linear):
            qm = QuantLinear(layer, p, cfg, input_relu6=info.input_relu6, input_nonneg=_nonneg(info))
        else:
            raise QuantConfigError(f"{info.name} is a {type(layer).__name__}: only Conv2d and Linear layers quantize")
        setattr(parent, attr, qm)
        _fuse_relu6(q, info.relu6_source, qm.aq)
        if qm.wq is not None:
            qm.wq.observing = False
            if qm.wq.lsq:  # LSQ weight step starts from the observer's range
                qm.wq.observe(qm.folded()[0].detach())
    if cfg.quantize_outputs and getattr(q, "quantizable_layers", None) is not None:
        _quantize_outputs(q, cfg)
    elif cfg.quantize_outputs and traced_adds:
        q = quantize_traced_adds(q, cfg)
    q.bitsearch_qconfig = cfg
    q.bitsearch_plan = {n: p for n, p in plan.items()}
    return q


def _quantize_outputs(model: nn.Module, cfg: QuantConfig) -> None:
    """QuantConfig.quantize_outputs: where the model says a layer's output is added back to its block's input
    (LayerInfo.residual) or pooled (LayerInfo.pooled_relu6), the layer quantizes its output too; a residual
    block's input is quantized once (SharedInput) for its branch and its skip. Only where the layers involved
    quantize their activations: otherwise that add or pooling stays FP32."""
    infos = described_layers(model)
    for info in infos:
        layer = model.get_submodule(info.name)
        if not isinstance(layer, QUANT_LAYERS) or layer.aq is None:
            continue
        if info.residual:
            first = model.get_submodule(next(i.name for i in infos if i.name.startswith(info.residual + ".")))
            block = model.get_submodule(info.residual)
            if isinstance(first, QUANT_LAYERS) and first.aq is not None and hasattr(block, "input_q"):
                layer.oq = _output_quantizer(first.aq.bits, cfg, relu6=False)
                block.input_q = SharedInput(first)
        if info.pooled_relu6:  # the output quantizer applies that ReLU6 (it comes before the module's place)
            parent_name, _, attr = info.pooled_relu6.rpartition(".")
            parent = model.get_submodule(parent_name)
            if isinstance(getattr(parent, attr, None), nn.ReLU6):
                layer.oq = _output_quantizer(layer.aq.bits, cfg, relu6=True)
                layer.oq.fused_relu6 = True
                setattr(parent, attr, nn.Identity())


def _output_quantizer(bits: int, cfg: QuantConfig, relu6: bool) -> FakeQuantizer:
    oq = act_quantizer(bits, cfg, relu6)
    oq.enabled = False  # until calibrated
    return oq


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}


def act_quantizers(model: nn.Module) -> list[FakeQuantizer]:
    """Every activation quantizer once (layers that read one shared tensor share its quantizer)."""
    qs = [q for m in quant_layers(model).values() for q in (m.aq, m.oq) if q is not None]
    return list({id(q): q for q in qs}.values())


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], num_batches: int | None = None) -> int:
    """Post-training calibration: run normalised input batches through the model (eval mode) with the
    activation observers on and activation fake-quant off; then fix the ranges and turn fake-quant on.
    Returns the number of batches used."""
    cfg = getattr(model, "bitsearch_qconfig", None)
    n_max = num_batches or (cfg.calib_batches if cfg else 8)
    aqs = act_quantizers(model)
    was = model.training
    model.eval()
    for a in aqs:
        a.observer.reset()
        a.observing, a.enabled = True, False
    n = 0
    for xb in batches:
        model(xb)
        n += 1
        if n >= n_max:
            break
    for a in aqs:
        a.observing, a.enabled = False, True
    model.train(was)
    if n == 0 and aqs:
        raise CalibrationError("calibration saw no batches: activation ranges would stay unset; give calibration "
                               "data (at least one batch)")
    return n


def set_bn_frozen(model: nn.Module, frozen: bool = True) -> None:
    """Freeze (True) or release BN statistics everywhere: in quantized conv units (which then use the
    exact folded form) and in layers kept FP32 (put in eval mode; the trainer's model.train() at each
    epoch start is undone by QATSchedule)."""
    for m in model.modules():
        if isinstance(m, QuantConvBn2d):
            m.bn_frozen = frozen
        if isinstance(m, nn.BatchNorm2d):
            m.bitsearch_frozen = frozen
            if frozen:
                m.eval()


def set_act_observing(model: nn.Module, observing: bool) -> None:
    """QAT: let activation ranges keep adapting (True) or hold them fixed (False). LSQ learns its step
    and never re-observes."""
    for a in act_quantizers(model):
        a.observing = observing and not a.lsq


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], num_batches: int) -> int:
    """Re-estimate the running statistics of every BN that is still live (not frozen) as a plain average
    over ``num_batches`` batches of the model as it now is (quantized weights and activations). A short
    QAT run leaves running statistics that lag behind the weights; this makes eval match training."""
    live = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and not getattr(m, "bitsearch_frozen", False)]
    if not live:
        return 0
    was = model.training
    saved = [(bn.momentum, bn) for bn in live]
    for bn in live:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    n = 0
    for xb in batches:
        model(xb)
        n += 1
        if n >= num_batches:
            break
    for mom, bn in saved:
        bn.momentum = mom
    model.train(was)
    return n


def freeze(model: nn.Module) -> nn.Module:
    """End of training: stop observing, freeze BN, store final scales. Idempotent."""
    set_bn_frozen(model, True)
    for m in model.modules():
        if isinstance(m, FakeQuantizer):
            m.observing = False
            m.freeze()
    return model


def live_bn_layers(model: nn.Module, cfg: QuantConfig) -> list[QuantConvBn2d]:
    """The conv+BN layers that keep BN live through the whole QAT fine-tuning: fewer weight bits than
    ``cfg.bn_live_below_bits`` (QAT only: LSQ keeps every BN frozen)."""
    if cfg.method is not Method.QAT:
        return []
    return [m for m in model.modules() if isinstance(m, QuantConvBn2d) and m.bn is not None and m.wq is not None
            and m.wq.bits < cfg.bn_live_below_bits]


def lr_scales(model: nn.Module, cfg: QuantConfig) -> dict[str, float]:
    """Learning-rate multiples for the optimiser (trainer.train's ``lr_scales``): the parameters of
    ``live_bn_layers`` train at ``cfg.live_bn_lr_factor`` x the QAT learning rate, every other one at 1x
    (left out)."""
    factor = float(cfg.live_bn_lr_factor)
    if factor == 1.0:
        return {}
    live = {id(m) for m in live_bn_layers(model, cfg)}
    known = dict(model.named_parameters())  # a quantizer two layers share is named once, under the first
    return {full: factor for name, m in model.named_modules() if id(m) in live for pn, _ in m.named_parameters()
            if (full := f"{name}.{pn}" if name else pn) in known}


class QATSchedule:
    """trainer Callback for quantization-aware training: BN statistics update until
    ``cfg.freeze_bn_epoch`` (QAT; LSQ keeps them frozen; in QAT layers with fewer weight bits than
    ``cfg.bn_live_below_bits`` keep them live throughout), activation ranges until
    ``cfg.freeze_observer_epoch`` (then fixed)."""

    def __init__(self, cfg: QuantConfig):
        self.cfg = cfg

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        # LSQ learns weight steps for the BN-folded weight: moving BN statistics would rescale the folded
        # weight under a fixed step, so LSQ keeps BN frozen from the start.
        frozen = epoch >= self.cfg.freeze_bn_epoch or self.cfg.method is Method.LSQ
        set_bn_frozen(model, frozen)
        if frozen:  # low-bit layers keep BN live (cfg.bn_live_below_bits)
            for m in live_bn_layers(model, self.cfg):
                m.bn_frozen = m.bn.bitsearch_frozen = False
                m.bn.train(model.training)
        set_act_observing(model, epoch < self.cfg.freeze_observer_epoch)

