"""Modules that hold quantization state and pick a code path; the math is in primitives.py.

* ``FakeQuantizer``  scale/zero-point buffers (or a learned LSQ step), an observer, and two switches:
  ``observing`` (update the range from what passes through) and ``enabled`` (fake-quantize or pass).
* ``QuantConvBn2d``  conv + its BN, folded: the weight that gets quantized is ``w * gamma / sigma``.
  While BN is live (QAT before ``freeze_bn_epoch``) the conv uses the folded, quantized weight and
  BN normalises its output with batch statistics (see ``_live_bn_forward``); otherwise it is
  exactly ``conv(aq(x), wq(w_fold)) + b_fold``. The input activation is quantized
  by ``aq`` before the conv, so activation bit-widths really apply.
* ``QuantLinear``    ``linear(aq(x), wq(w)) + b``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from quantization.config import Granularity, Method
from quantization.observers import MinMaxObserver, make_observer
from quantization.primitives import (EPS, choose_qparams, fake_quantize, fake_quantize_relu6, folded_weight_fake_quantize,
                                     lsq_fake_quantize, qrange)

RELU6_MAX = 6.0


class FakeQuantizer(nn.Module):
    """Fake-quantizes a tensor at ``bits``.

    ``axis``: per-channel along this dimension (weights), None: per-tensor. ``signed=False`` for
    non-negative inputs (after ReLU6: zero-point 0 and the top of the range clipped at ``max_clip``).
    ``dynamic``: recompute the range from each tensor (weights, which change while training).
    ``lsq``: the step size is a trainable parameter initialised from the observer.
    """

    def __init__(self, bits: int, symmetric: bool, *, signed: bool = True, axis: int | None = None,
                 channels: int = 1, observer: str = "minmax", percentile: float = 99.99, lsq: bool = False,
                 dynamic: bool = False, max_clip: float | None = None):
        super().__init__()
        self.bits, self.symmetric, self.signed, self.axis = bits, symmetric, signed, axis
        self.qmin, self.qmax = qrange(bits, signed, True) if symmetric else qrange(bits, False)
        self.observer = make_observer(observer, axis, percentile)
        shape = (channels,) if axis is not None else ()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.lsq, self.dynamic, self.max_clip = lsq, dynamic and not lsq, max_clip
        if lsq:
            self.step = nn.Parameter(torch.ones(shape))
        self.observing = True
        self.enabled = True
        # set by prepare() when the ReLU6 that feeds this (unsigned, per-tensor) quantizer was removed
        # from the model: the quantizer then applies it (fake_quantize_relu6: same values, one pass less)
        self.fused_relu6 = False

    def extra_repr(self) -> str:
        kind = "per-channel" if self.axis is not None else "per-tensor"
        return (f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}, "
                f"{'signed' if self.signed else 'unsigned'}, {kind}, lsq={self.lsq}"
                + (", fused_relu6" if self.fused_relu6 else ""))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        if self.dynamic:
            self.observer.fresh(x)
        else:
            self.observer(x)
        lo, hi = self.observer.range(self.bits, self.symmetric, self.signed)
        if self.max_clip is not None:
            hi = torch.clamp(hi, max=self.max_clip)
        if not self.signed:
            lo = torch.zeros_like(lo)
        s, z = choose_qparams(lo, hi, self.bits, self.symmetric, self.signed)
        self.scale, self.zero_point = s.to(self.scale.device), z.to(self.scale.device)
        if self.lsq:
            self.step.copy_(s)

    def fold_quantize(self, w: torch.Tensor, gamma: torch.Tensor, var: torch.Tensor, eps: float, frozen: bool = False):
        """``self(w * gamma / sqrt(var + eps))`` and the fold factor, in one autograd node
        (``folded_weight_fake_quantize``; ``frozen``: the gradient of a frozen fold), for a weight quantizer
        that takes a fresh minmax range on a signed symmetric grid (the default); None for any other kind:
        the caller takes the general path."""
        if not (self.enabled and self.dynamic and self.symmetric and self.signed and self.max_clip is None
                and type(self.observer) is MinMaxObserver):
            return None
        out, sf, lo, hi, s = folded_weight_fake_quantize(w, gamma, var, eps, self.bits, self.axis is not None, frozen)
        self.observer.min_val, self.observer.max_val = lo, hi
        self.scale = s
        return out, sf

    def effective_scale(self) -> torch.Tensor:
        return self.step.detach().abs() + EPS if self.lsq else self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:  # under bf16 autocast: the quantizer's arithmetic stays exact, in FP32
            x = x.float()
        if self.fused_relu6 and self.enabled and not self.observing and not (self.lsq and self.training):
            return fake_quantize_relu6(x, self.effective_scale(), self.qmax, RELU6_MAX)
        if self.fused_relu6:  # observing, disabled or learning an LSQ step: the ReLU6 as such first
            x = F.relu6(x)
        if self.observing or (self.dynamic and self.enabled):
            self.observe(x)
        if not self.enabled:
            return x
        if self.lsq and self.training and torch.is_grad_enabled():
            return lsq_fake_quantize(x, self.step.abs() + EPS, self.zero_point, self.qmin, self.qmax, self.axis)
        zp = None if self.symmetric else self.zero_point  # symmetric grids: zero-point 0
        return fake_quantize(x, self.effective_scale(), zp, self.qmin, self.qmax, self.axis)

    def freeze(self) -> None:
        """Store the final (effective) scale in the buffer: what convert/pack read."""
        if self.lsq:
            self.scale = self.effective_scale().detach().clone()


def act_quantizer(bits: int, cfg, relu6: bool, nonneg: bool = False) -> FakeQuantizer:
    """The quantizer of an activation: unsigned after ReLU6 (clipped at 6) or any other non-negative op."""
    return FakeQuantizer(bits, cfg.a_symmetric, signed=not (relu6 or nonneg), observer=cfg.a_observer,
                         percentile=cfg.percentile, lsq=cfg.method == Method.LSQ, max_clip=RELU6_MAX if relu6 else None)


def _weight_quantizer(bits: int, cfg, granularity: Granularity, channels: int) -> FakeQuantizer:
    per_ch = granularity == Granularity.PER_CHANNEL
    return FakeQuantizer(bits, cfg.w_symmetric, signed=True, axis=0 if per_ch else None,
                         channels=channels if per_ch else 1, observer=cfg.w_observer, percentile=cfg.percentile,
                         lsq=cfg.method == Method.LSQ, dynamic=True)


class _QuantLayer(nn.Module):
    """Shared: the weight/activation quantizers and the eval-time cache of the quantized weight."""

    def _setup(self, plan, cfg, channels: int, relu6: bool, nonneg: bool = False) -> None:
        self.w_bits, self.a_bits = plan.w_bits, plan.a_bits
        self.wq = _weight_quantizer(plan.w_bits, cfg, plan.w_granularity, channels) if plan.w_bits != 32 else None
        self.aq = act_quantizer(plan.a_bits, cfg, relu6, nonneg) if plan.a_bits != 32 else None
        if self.aq is not None:
            self.aq.enabled = False  # until calibrated
        # set by prepare (QuantConfig.quantize_outputs): the quantizer of this layer's output, where an integer
        # runtime needs it on a grid (the branch of a residual add, the input of pooling); and whether ``aq`` is
        # applied outside, by the block's SharedInput (the skip reads the same quantized tensor)
        self.oq: FakeQuantizer | None = None
        self.aq_outside = False
        self.int_bias = cfg.quantize_outputs  # the bias on the int32 grid (bias_scale): part of the same setting
        self._cache: tuple | None = None

    def _versions(self) -> tuple:
        ts = [t for t in self._fold_inputs() if t is not None]
        for q in (self.wq, self.aq):
            if q is not None:
                ts += [q.scale] + ([q.step] if q.lsq else [])
        return tuple((t.data_ptr(), t._version) for t in ts) + (self.aq is not None and self.aq.enabled,)

    def bias_scale(self) -> torch.Tensor | None:
        """The step of the bias grid, input scale x weight scale (per output channel): integer kernels add
        the bias to their int32 accumulator in these units. None while either side is not quantized."""
        if not self.int_bias or self.wq is None or self.aq is None or not self.aq.enabled:
            return None
        return (self.aq.effective_scale().detach() * self.wq.effective_scale().detach()).reshape(-1)

    def _bias_on_grid(self, b: torch.Tensor | None) -> torch.Tensor | None:
        """The bias rounded to the int32 grid (``bias_scale``); gradients pass straight through."""
        s = self.bias_scale()
        if b is None or s is None:
            return b
        return b + (torch.round(b / s) * s - b).detach()

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        return self.aq(x) if self.aq is not None and not self.aq_outside else x

    def _write(self, y: torch.Tensor) -> torch.Tensor:
        return self.oq(y) if self.oq is not None else y

    def quantized_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (fake-)quantized folded weight and folded bias used in inference. Cached while the
        parameters do not change (eval), so evaluation does not re-quantize every batch."""
        cacheable = not (self.training and torch.is_grad_enabled())
        if cacheable and self._cache is not None and self._cache[0] == self._versions():
            return self._cache[1], self._cache[2]
        w, b = self.folded()
        wq = self.wq(w) if self.wq is not None else w
        b = self._bias_on_grid(b)
        if cacheable:
            self._cache = (self._versions(), wq.detach(), None if b is None else b.detach())
        return wq, b

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    @torch.no_grad()
    def weight_error(self) -> torch.Tensor:
        """What quantizing does to the trained weight: quantized minus float weight, in the layer's own
        (unfolded) parametrisation, the one its gradient and Hessian refer to."""
        w, _ = self.folded()
        wq, _ = self.quantized_weight_bias()
        d = wq - w
        bn = getattr(self, "bn", None)
        return d / self._bn_factor().reshape(-1, *([1] * (d.ndim - 1))) if bn is not None else d


class _FoldStep(torch.autograd.Function):
    """``w * sf`` forward; backward hands ``w`` the incoming gradient divided by ``sf`` instead of
    multiplied by it, so an SGD step on ``w`` moves ``w * sf`` as a step on ``w * sf`` itself would (the
    momentum buffer is linear in the gradient, so this holds with momentum too). Channels whose ``sf``
    is 0 (gamma 0: the channel outputs a constant) get no weight gradient."""

    @staticmethod
    def forward(ctx, w, sf):
        ctx.save_for_backward(sf)
        return w * sf

    @staticmethod
    def backward(ctx, g):
        sf, = ctx.saved_tensors
        live = sf.abs() > EPS
        return torch.where(live, g / torch.where(live, sf, 1.0), 0.0), None


class QuantConvBn2d(_QuantLayer):
    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, plan, cfg, input_relu6: bool = False,
                 input_nonneg: bool = False):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.bn_frozen = False
        self._setup(plan, cfg, conv.out_channels, input_relu6, input_nonneg)

    def _fold_inputs(self):
        bn = self.bn
        return [self.conv.weight, self.conv.bias] + ([] if bn is None else
                                                     [bn.weight, bn.bias, bn.running_mean, bn.running_var])

    def _bn_factor(self) -> torch.Tensor:
        return self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)   # gamma / sigma, [C]

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """BN folded into the conv: w * gamma/sigma and beta + (b - mu) * gamma/sigma.

        Training with BN frozen the fold is a fixed per-channel scale, and the layer trains as the folded
        conv would (``_FoldStep``): gamma and the conv's bias get no gradient (they duplicate w's channel
        scale and beta) and a step moves ``w * gamma/sigma`` by ``lr`` times its own gradient, whatever
        sigma the baseline ended with. Through the plain product that step would be ``(gamma/sigma)^2``
        times larger: on a baseline with small BN sigmas (strong weight decay) a learning rate that suits
        another baseline diverges."""
        if self.bn is None:
            return self.conv.weight, self.conv.bias
        sf = self._bn_factor()
        if self.training and torch.is_grad_enabled():
            sf = sf.detach()
            return _FoldStep.apply(self.conv.weight, sf.reshape(-1, 1, 1, 1)), self._folded_bias(sf)
        return self.conv.weight * sf.reshape(-1, 1, 1, 1), self._folded_bias(sf)

    def _folded_bias(self, sf: torch.Tensor) -> torch.Tensor:
        """beta + (b - mu) * sf; the conv's bias gets no gradient while training (it duplicates beta)."""
        b = self.conv.bias if self.conv.bias is not None else torch.zeros_like(self.bn.running_mean)
        if self.training and torch.is_grad_enabled():
            b = b.detach()
        return self.bn.bias + (b - self.bn.running_mean) * sf

    def quantized_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.bn is not None and self.wq is not None and self.training and torch.is_grad_enabled():
            # training with BN frozen: folded() and the weight quantizer in one autograd node where it can
            fused = self.wq.fold_quantize(self.conv.weight, self.bn.weight, self.bn.running_var, self.bn.eps, frozen=True)
            if fused is not None:
                return fused[0], self._bias_on_grid(self._folded_bias(fused[1]))
        return super().quantized_weight_bias()

    def _conv(self, x, w, b):
        return self.conv._conv_forward(x, w, b)  # the conv's own kernel choice (trainer.model.Conv2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._read(x)
        if self.bn is not None and self.training and not self.bn_frozen:
            return self._write(self._live_bn_forward(x))
        w, b = self.quantized_weight_bias()
        return self._write(self._conv(x, w, b))

    def _live_bn_forward(self, x: torch.Tensor) -> torch.Tensor:
        """QAT with live BN: quantize the weight folded with the running sigma (sf = gamma/sigma),
        convolve, and normalise with batch statistics, updating the running statistics.

        Equals the textbook BN(conv(x, q(w*sf)) / sf) (Jacob et al. 2018, Krishnamoorthi 2018):
        BN with batch statistics is invariant to a per-channel scale, so the division by sf is
        skipped (one full-size pass forward and three backward fewer), and the running
        statistics stay in unscaled units by handing them to batch_norm multiplied by sf (mean)
        and sf^2 (var) and dividing the updated values back. The only difference is BN's eps,
        which acts as eps * sf^2 per channel. tests/test_quant_modules.py checks outputs,
        running statistics and gradients against the textbook form.
        """
        bn, conv = self.bn, self.conv
        # gamma also learns through q(w * sf), as in the textbook form
        fused = None if self.wq is None or conv.bias is not None else self.wq.fold_quantize(
            conv.weight, bn.weight, bn.running_var, bn.eps)
        if fused is not None:  # the default weight quantizer: fold and quantize in one autograd node
            wq, sfd = fused
            y = self._conv(x, wq, None)
        else:
            sf = self._bn_factor()
            w = conv.weight * sf.reshape(-1, 1, 1, 1)
            b = None if conv.bias is None else conv.bias * sf
            y = self._conv(x, self.wq(w) if self.wq is not None else w, b)
            sfd = sf.detach()
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        with torch.no_grad():  # to the conv output's units and back (new tensors: batch_norm saves them)
            sf2 = sfd * sfd  # (running_var * sfd) * sfd: the rounding of the textbook form, bit for bit
            rm, rv = bn.running_mean * sfd, bn.running_var * sfd * sfd
        out = F.batch_norm(y, rm, rv, bn.weight, bn.bias, True, momentum, bn.eps)
        with torch.no_grad():
            torch.div(rm, sfd, out=bn.running_mean)
            torch.div(rv, sf2, out=bn.running_var)
        return out

    @torch.no_grad()
    def fold_(self) -> None:
        """Replace conv+BN by the folded conv (what a packed file stores)."""
        w, b = self.folded()
        self.conv.weight = nn.Parameter(w.detach().clone())
        self.conv.bias = nn.Parameter(b.detach().clone())
        self.bn = None
        self._cache = None


class QuantLinear(_QuantLayer):
    def __init__(self, linear: nn.Linear, plan, cfg, input_relu6: bool = False, input_nonneg: bool = False):
        super().__init__()
        self.linear = linear
        self._setup(plan, cfg, linear.out_features, input_relu6, input_nonneg)

    def _fold_inputs(self):
        return [self.linear.weight, self.linear.bias]

    def folded(self):
        return self.linear.weight, self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.quantized_weight_bias()
        return self._write(F.linear(self._read(x), w, b))

    def fold_(self) -> None:
        self._cache = None


class SharedInput(nn.Module):
    """Applies ``layer.aq`` to a residual block's input, so the branch (whose first layer then skips its
    own ``aq``) and the skip add the same quantized tensor, as an integer runtime computes it. The layer is
    held as a plain reference: its quantizer stays registered (and saved) under the layer."""

    def __init__(self, layer: _QuantLayer):
        super().__init__()
        self._layer = [layer]
        layer.aq_outside = True

    @property
    def layer(self) -> _QuantLayer:
        return self._layer[0]

    @property
    def quantizer(self) -> FakeQuantizer:
        return self._layer[0].aq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(x)


class Requantize(SharedInput):
    """Puts a tensor made from one that ``layer.aq`` quantized (sliced, zero-padded, max-pooled: its values
    are still on that grid) back on the grid, where an integer runtime needs the quantize step again (before
    a residual add). The values do not change, and the quantizer does not observe them: its range is the
    source tensor's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        observing, q.observing = q.observing, False
        try:
            return q(x)
        finally:
            q.observing = observing
