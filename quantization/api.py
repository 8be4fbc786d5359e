"""One entry point: prepare(model, config) -> calibrate / fine-tune -> pack (convert).

``prepare`` copies an FP32 model and swaps every quantizable conv (with its BN) and linear for a
fake-quant module according to the config's per-layer plan. Quantizable layers are the convs of
``ConvBNAct``-style units (a ``conv`` followed by a ``bn``) and ``nn.Linear`` layers; their names are
the model's module names (``blocks.3.dw.conv``, ``classifier``).
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from quantization.config import QuantConfig
from quantization.modules import FakeQuantizer, QuantConvBn2d, QuantLinear

QUANT_LAYERS = (QuantConvBn2d, QuantLinear)


class CalibrationError(ValueError):
    """Calibration could not set the activation ranges (no data)."""


def quantizable_layers(model: nn.Module) -> dict[str, tuple[nn.Module, str, nn.Module, nn.Module | None]]:
    """name -> (parent, attribute, layer, bn or None) for every conv/linear that can be quantized."""
    out = {}
    for pname, parent in model.named_modules():
        for attr, child in parent.named_children():
            name = f"{pname}.{attr}" if pname else attr
            if isinstance(child, nn.Conv2d):
                bn = getattr(parent, "bn", None) if attr == "conv" else None
                out[name] = (parent, attr, child, bn if isinstance(bn, nn.BatchNorm2d) else None)
            elif isinstance(child, nn.Linear):
                out[name] = (parent, attr, child, None)
    return out


def _fuse_relu6(model: nn.Module, layer: nn.Module, qm: nn.Module) -> None:
    """Let the activation quantizer of ``qm`` apply the ReLU6 that feeds it (``relu6_source``, read
    by this layer only) and drop that module: same values, one full-size pass fewer each way."""
    src = getattr(layer, "relu6_source", None)
    if src is None or qm.aq is None or qm.aq.signed or qm.aq.axis is not None:
        return
    parent_name, _, attr = src.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(getattr(parent, attr, None), nn.ReLU6):
        setattr(parent, attr, nn.Identity())
        qm.aq.fused_relu6 = True


def plan_for(model: nn.Module, cfg: QuantConfig) -> dict:
    """Each quantizable layer's resolved settings; QuantConfigError for a layer pattern that matches
    nothing in ``model`` (cheap: check a config against a model before any work)."""
    layers = quantizable_layers(model)
    others = [n for n, _ in model.named_modules() if n and n not in layers]
    return cfg.plan(layers, others)


def prepare(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """A fake-quant copy of ``model`` (the original is untouched). Unknown layer patterns in ``cfg``
    raise QuantConfigError. Weights are quantized at once; activations after ``calibrate``."""
    q = copy.deepcopy(model)
    layers = quantizable_layers(q)
    plan = plan_for(q, cfg)
    for name, (parent, attr, layer, bn) in layers.items():
        p = plan[name]
        if not p.quantized:
            continue
        if isinstance(layer, nn.Conv2d):
            qm = QuantConvBn2d(layer, bn, p, cfg)
            if bn is not None:
                parent.bn = nn.Identity()
        else:
            qm = QuantLinear(layer, p, cfg)
        setattr(parent, attr, qm)
        _fuse_relu6(q, layer, qm)
        if qm.wq is not None:
            qm.wq.observing = False
            if qm.wq.lsq:  # LSQ weight step starts from the observer's range
                qm.wq.observe(qm.folded()[0].detach())
    q.bitsearch_qconfig = cfg
    q.bitsearch_plan = {n: p for n, p in plan.items()}
    return q


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}


def act_quantizers(model: nn.Module) -> list[FakeQuantizer]:
    return [m.aq for m in quant_layers(model).values() if m.aq is not None]


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


class QATSchedule:
    """trainer Callback for quantization-aware training: BN statistics update until
    ``cfg.freeze_bn_epoch`` (QAT; LSQ keeps them frozen), activation ranges until
    ``cfg.freeze_observer_epoch`` (then fixed)."""

    def __init__(self, cfg: QuantConfig):
        self.cfg = cfg

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        # LSQ learns weight steps for the BN-folded weight: moving BN statistics would rescale the folded
        # weight under a fixed step, so LSQ keeps BN frozen from the start.
        set_bn_frozen(model, epoch >= self.cfg.freeze_bn_epoch or self.cfg.method == "lsq")
        set_act_observing(model, epoch < self.cfg.freeze_observer_epoch)

