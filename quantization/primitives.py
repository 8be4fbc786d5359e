"""Quantizer math as pure tensor functions. Everything else in quantization/ wraps these.

Conventions
-----------
* Affine quantization: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``,
  ``x_hat = (q - zero_point) * scale``. Rounding is half-to-even (``torch.round``), like torch's own
  fake-quant ops.
* Symmetric + signed uses the *narrow* range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` so that zero is exact and
  the grid is symmetric (2-bit symmetric = ternary {-1, 0, 1}). Symmetric + unsigned (non-negative
  data, e.g. after ReLU6) uses ``[0, 2^b - 1]`` with zero_point 0. Asymmetric is unsigned
  ``[0, 2^b - 1]`` with a zero_point.
* ``axis`` selects per-channel parameters (scale has one entry per index along ``axis``);
  ``axis=None`` is per-tensor.
"""
from __future__ import annotations

import math
import os
import warnings

import torch

MIN_BITS, MAX_BITS = 2, 8
EPS = 1e-8


def qrange(bits: int, signed: bool, symmetric: bool = True) -> tuple[int, int]:
    """Integer range of a ``bits``-bit code.

    >>> qrange(8, signed=True)
    (-127, 127)
    >>> qrange(8, signed=False)
    (0, 255)
    >>> qrange(2, signed=True)
    (-1, 1)
    >>> qrange(4, signed=True, symmetric=False)
    (-8, 7)
    """
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits} is out of range: allowed {MIN_BITS}..{MAX_BITS}")
    if not signed:
        return 0, 2 ** bits - 1
    hi = 2 ** (bits - 1) - 1
    return (-hi if symmetric else -hi - 1), hi


def _bcast(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape per-channel parameters ``t`` [C] to broadcast against ``x`` along ``axis``."""
    if axis is None or t.ndim == 0:
        return t
    shape = [1] * x.ndim
    shape[axis] = -1
    return t.reshape(shape)


def channel_rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``x`` as a 2-D [channels, values] view: one row per channel along ``axis``, or one row (axis None)."""
    return x.reshape(1, -1) if axis is None else x.transpose(0, axis).reshape(x.shape[axis], -1)


def reduce_minmax(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (axis None) or per-channel min and max."""
    if axis is None:
        return torch.aminmax(x)
    return torch.aminmax(channel_rows(x, axis), dim=1)  # one pass (and one kernel call) for both


def choose_qparams(min_val: torch.Tensor, max_val: torch.Tensor, bits: int, symmetric: bool,
                   signed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point covering [min_val, max_val] (tensors: scalars or per-channel).

    The range is widened to include 0 so that zero is represented exactly.

    >>> s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(1.0), 8, symmetric=True)
    >>> round(s.item() * 127, 6), z.item()
    (1.0, 0)
    >>> s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), 2, symmetric=False)
    >>> round(s.item(), 6), z.item()
    (1.333333, 1)
    >>> s, z = choose_qparams(torch.tensor(0.0), torch.tensor(6.0), 4, symmetric=True, signed=False)
    >>> round(s.item(), 6), z.item()
    (0.4, 0)
    """
    min_val, max_val = min_val.float(), max_val.float()
    if symmetric:  # the range widened to include 0: max(-min, max, 0), or max(max, 0) unsigned
        qmin, qmax = qrange(bits, signed, True)
        amax = (torch.maximum(-min_val, max_val) if signed else max_val).clamp(min=0.0)
        scale = amax.div_(qmax).clamp_(min=EPS)
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        min_val, max_val = torch.clamp(min_val, max=0.0), torch.clamp(max_val, min=0.0)
        qmin, qmax = qrange(bits, signed=False)
        scale = torch.clamp((max_val - min_val) / (qmax - qmin), min=EPS)
        zp = torch.clamp(qmin - torch.round(min_val / scale), qmin, qmax).to(torch.int32)
    return scale, zp


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
             axis: int | None = None) -> torch.Tensor:
    """Float -> integer codes (int32 tensor in [qmin, qmax]).

    >>> quantize(torch.tensor([-1.0, 0.02, 0.5, 9.0]), torch.tensor(0.1), torch.tensor(0), -7, 7).tolist()
    [-7, 0, 5, 7]
    """
    s, z = _bcast(scale, x, axis), _bcast(zero_point, x, axis)
    return torch.clamp(torch.round(x / s) + z, qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Integer codes -> float: ``(q - zero_point) * scale``.

    >>> dequantize(torch.tensor([-7, 0, 5]), torch.tensor(0.5), torch.tensor(0)).tolist()
    [-3.5, 0.0, 2.5]
    """
    s, z = _bcast(scale, q, axis), _bcast(zero_point, q, axis)
    return (q.float() - z) * s


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int,
                  axis: int | None = None) -> torch.Tensor:
    """quantize -> dequantize in float, differentiable with the straight-through estimator: the
    gradient wrt ``x`` is 1 where ``x`` lies inside the representable range and 0 where it is clipped
    (as in torch.fake_quantize_per_tensor_affine). ``scale`` is treated as a constant. ``zero_point``
    None: all zero (symmetric grids), two passes fewer; under torch.compile and on a GPU a zero-point
    tensor is added, never read to decide (no graph break, no wait). Training per-tensor on a CPU in eager
    mode, scale and zero-point are read as numbers (``_FakeQuantRangeSTE``: fewer passes).

    >>> fake_quantize(torch.tensor([0.26, -3.0]), torch.tensor(0.5), torch.tensor(0), -1, 1).tolist()
    [0.5, -0.5]
    """
    s = _bcast(scale.detach(), x, axis)
    z = None if zero_point is None else _bcast(zero_point, x, axis)
    if x.requires_grad and torch.is_grad_enabled():
        if axis is None and _read_ok(s):
            return _FakeQuantRangeSTE.apply(x, s, 0 if z is None else int(z), qmin, qmax)
        return _FakeQuantSTE.apply(x, s, z, qmin, qmax)
    # inference: bit-identical to dequantize(quantize(x)); per tensor on a CPU the codes are clamped to
    # [qmin - z, qmax - z] (one compiled pass on a large tensor), else in place on one buffer
    if axis is None and _read_ok(s):
        zi = 0 if z is None else int(z)
        return clamped_codes_times_scale(x, float(s), qmin - zi, qmax - zi)
    if z is None:
        return _codes_times_scale_eager(x, s, qmin, qmax)
    return (x / s).round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)


class _FakeQuantSTE(torch.autograd.Function):
    """Fused fake-quant with the straight-through estimator: forward = quantize -> dequantize on one
    buffer; backward = the incoming gradient where round(x / s) + z lies in [qmin, qmax], else 0.
    Same values and gradient as composing a straight-through round and clamp, with two tensors instead of ten."""

    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax):
        v = (x / s).round_()
        if z is not None:
            v.add_(z)
        q = v.clamp(qmin, qmax)
        ctx.save_for_backward(q == v)  # inside the range: the gradient passes
        if z is not None:
            q.sub_(z)
        return q.mul_(s)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0.0), None, None, None, None


# Large tensors on a CPU (eager): the four passes of ``(x / s).round_().clamp_(lo, hi).mul_(s)`` as one
# torch.compile'd (inductor) loop, about a ReLU6's cost (1M elements: the tests' tiny models stay eager)
COMPILED_MIN_NUMEL = 1 << 20
_compiled_kernel = None  # built on first use; False once building it failed (e.g. no C++ compiler)


def _codes_times_scale_math(x, s, lo, hi):
    return torch.clamp(torch.round(x / s), lo, hi) * s


def _codes_times_scale_eager(x, s, lo, hi):
    """The same values in four passes on one new buffer (bounds and scale: numbers or tensors)."""
    return (x / s).round_().clamp_(lo, hi).mul_(s)


def clamped_codes_times_scale(x: torch.Tensor, s: float, lo: float, hi: float) -> torch.Tensor:
    """``round(x / s)`` clamped to ``[lo, hi]``, times ``s``: the forward of the CPU straight-through
    quantizers. Eagerly that is four full-size passes; for tensors of ``COMPILED_MIN_NUMEL`` elements or
    more it runs as one inductor kernel compiled once per process (``dynamic=True``: every shape, scale and
    bound share it; the same values: tested) unless ``BITSEARCH_FUSED_QUANT=0`` or compiling failed."""
    global _compiled_kernel
    if x.numel() >= COMPILED_MIN_NUMEL and _compiled_kernel is not False and os.environ.get("BITSEARCH_FUSED_QUANT") != "0":
        try:
            if _compiled_kernel is None:
                _compiled_kernel = torch.compile(_codes_times_scale_math, dynamic=True)
            return _compiled_kernel(x, torch.tensor(s), torch.tensor(float(lo)), torch.tensor(float(hi)))
        except Exception as e:  # noqa: BLE001 - any failure to build the kernel: the eager passes
            warnings.warn(f"compiling the fused quantizer kernel failed ({type(e).__name__}: {str(e)[:200]}); "
                          "quantizers run eagerly")
            _compiled_kernel = False
    return _codes_times_scale_eager(x, s, lo, hi)


class _FakeQuantRangeSTE(torch.autograd.Function):
    """Per-tensor fake-quant on a CPU in eager mode (scale and zero-point read as numbers): the codes
    clamped to ``[qmin - z, qmax - z]`` before the zero-point would be added (the same values, two passes
    fewer), and, like ``_FakeQuantReLU6STE``, it keeps ``x`` and the backward is ReLU6's kernel with the
    range's limits: the gradient passes where ``s * (qmin - z - 0.5) < x < s * (qmax - z + 0.5)``, one
    pass, and no mask built in the forward. That is the straight-through mask of ``_FakeQuantSTE`` except
    at a rounding tie exactly on a limit (which ``torch.round`` may send inside: half to even) and within
    an ulp of one (``x < s * k`` against ``x / s < k``)."""

    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax):
        s = float(s)
        lo, hi = qmin - z, qmax - z
        ctx.limits = (s * (lo - 0.5), s * (hi + 0.5))
        ctx.save_for_backward(x)
        return clamped_codes_times_scale(x, s, lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, x, *ctx.limits), None, None, None, None


def folded_weight_fake_quantize(w: torch.Tensor, gamma: torch.Tensor, var: torch.Tensor, eps: float, bits: int,
                                per_channel: bool, frozen: bool = False):
    """``fake_quantize(w * sf)``, ``sf = gamma / sqrt(var + eps)`` (a conv weight with its BN folded in), on the
    signed symmetric ``bits``-bit grid whose range is the folded weight's own min/max (per output channel
    or per tensor): what a QAT step does for each layer's weight (a fresh minmax observer), as one autograd
    node with half the operations. With the range taken from the tensor itself no value is clipped
    (``|w sf| / s <= qmax`` up to rounding), so the straight-through gradient is the identity and the scale
    is held constant, as in ``fake_quantize``. BN live: ``w`` gets ``g * sf`` and ``gamma``
    ``sum(g * w) / sigma`` per channel. ``frozen``: the fold is a fixed scale that the folded conv trains
    through, ``w`` gets ``g / sf`` (0 where ``sf`` is 0) and ``gamma`` nothing (``_FoldStep``).
    Returns the quantized folded weight, then ``sf``, the folded weight's min and max and the scale (not
    differentiable)."""
    return _FoldedWeightFQ.apply(w, gamma, var, float(eps), bits, per_channel, frozen)


class _FoldedWeightFQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, gamma, var, eps, bits, per_channel, frozen):
        sigma = torch.sqrt(var + eps)
        sf = gamma / sigma
        shape = (-1,) + (1,) * (w.ndim - 1)
        wf = w * sf.reshape(shape)
        lo, hi = reduce_minmax(wf, 0 if per_channel else None)
        s, _ = choose_qparams(lo, hi, bits, True, True)
        out = _codes_times_scale_eager(wf, s.reshape(shape) if per_channel else s, *qrange(bits, True, True))
        ctx.save_for_backward(w, sf, sigma)
        ctx.frozen = frozen
        ctx.mark_non_differentiable(sf, lo, hi, s)
        ctx.set_materialize_grads(False)  # no zero tensors built for the four outputs without a gradient
        return out, sf, lo, hi, s

    @staticmethod
    def backward(ctx, g, *_):
        w, sf, sigma = ctx.saved_tensors
        if g is None:
            return (None,) * 7
        shape = (-1,) + (1,) * (w.ndim - 1)
        if ctx.frozen:  # as _FoldStep's backward, bit for bit
            sfb = sf.reshape(shape)
            live = sfb.abs() > EPS
            return torch.where(live, g / torch.where(live, sfb, 1.0), 0.0), *(None,) * 6
        gw = g * sf.reshape(shape) if ctx.needs_input_grad[0] else None
        gg = (g * w).sum(dim=tuple(range(1, w.ndim))).div_(sigma) if ctx.needs_input_grad[1] else None
        return gw, gg, *(None,) * 5


def fake_quantize_relu6(x: torch.Tensor, scale: torch.Tensor, qmax: int, top: float = 6.0) -> torch.Tensor:
    """``fake_quantize(relu6(x))`` on the unsigned per-tensor grid ``[0, qmax]`` (zero-point 0) in one
    step, so a quantized layer can absorb the ReLU6 in front of it. Clamping the codes to
    ``[0, min(qmax, round(top / s))]`` does ReLU6's clipping: the values are identical to ReLU6 then
    ``fake_quantize``; the gradient is ReLU6's (1 where 0 < x < top) times the straight-through mask.

    >>> fake_quantize_relu6(torch.tensor([-1.0, 0.26, 2.9, 7.0]), torch.tensor(0.5), 15).tolist()
    [0.0, 0.5, 3.0, 6.0]
    """
    s = scale.detach()
    if x.requires_grad and torch.is_grad_enabled():
        return _FakeQuantReLU6STE.apply(x, s, qmax, top)
    if _read_ok(s):  # inference on a CPU: one compiled pass on a large tensor
        return clamped_codes_times_scale(x, float(s), *_relu6_codes(s, qmax, top))
    return _codes_times_scale_eager(x, s, *_relu6_codes(s, qmax, top))


def _relu6_codes(s: torch.Tensor, qmax: int, top: float) -> tuple:
    """The code range after ReLU6: 0 and the code ReLU6's top value rounds to. Numbers on a CPU in eager
    mode (clamp's one-input kernel: 3x faster there than a clamp with tensor bounds); tensors under
    torch.compile (reading the value would break the graph) and on a GPU (it would wait for the GPU)."""
    hi = torch.clamp(torch.round(top / s), max=qmax)
    return (0.0, float(hi)) if _read_ok(s) else (torch.zeros_like(hi), hi)


def _relu6_pass_limit(s: torch.Tensor, qmax: int, top: float):
    """Below this input ReLU6 passes the gradient and the code stays <= qmax: min(top, s * (qmax + 0.5))."""
    lim = torch.clamp(s * (qmax + 0.5), max=top)
    return float(lim) if _read_ok(s) else lim


def _read_ok(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s value as a number is free: a CPU tensor, outside torch.compile."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


class _FakeQuantReLU6STE(torch.autograd.Function):
    """ReLU6 + fake-quant: the gradient passes where 0 < x < min(top, s * (qmax + 0.5)), i.e. ReLU6 passes
    it and round(x / s) <= qmax (ties at qmax + 0.5 round to the even qmax + 1: clipped).

    On a CPU in eager mode it keeps ``x`` (as ReLU6 does) and the backward is ReLU6's own kernel with that
    upper limit, ``hardtanh_backward``: one pass, and no mask to build in the forward (three passes
    fewer). Elsewhere (a tensor limit) it keeps the bool mask."""

    @staticmethod
    def forward(ctx, x, s, qmax, top):
        ctx.limit = _relu6_pass_limit(s, qmax, top)
        if isinstance(ctx.limit, float):  # a CPU in eager mode
            ctx.save_for_backward(x)
            return clamped_codes_times_scale(x, float(s), *_relu6_codes(s, qmax, top))
        ctx.save_for_backward((x > 0) & (x < ctx.limit))
        return _codes_times_scale_eager(x, s, *_relu6_codes(s, qmax, top))

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        if isinstance(ctx.limit, float):
            return torch.ops.aten.hardtanh_backward(grad, t, 0.0, ctx.limit), None, None, None
        return grad * t, None, None, None  # as torch.where(t, grad, 0) for finite gradients, faster on a CPU


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      axis: int | None = None, grad_factor: float | None = None) -> torch.Tensor:
    """Learned step size quantization (Esser et al. 2020): like ``fake_quantize`` but ``scale`` (and a
    float ``zero_point`` that requires grad) are trainable, with the gradients of
    ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``:

    * input: the incoming gradient where ``round(x / s + z)`` lies in ``[qmin, qmax]`` (bounds included),
      else 0;
    * scale: ``(q - z) - x / s`` inside the range, ``qmin - z`` / ``qmax - z`` below / above it;
    * zero-point: 0 inside, ``-s`` outside;

    both parameter gradients multiplied by ``grad_factor`` (default ``1 / sqrt(N * qmax)``, N = elements
    sharing one scale), which keeps step-size updates commensurate with weight updates.
    """
    if grad_factor is None:
        n = x.numel() / max(1, scale.numel())
        grad_factor = 1.0 / (max(1, qmax) * n) ** 0.5
    return _LSQ.apply(x, scale, zero_point, qmin, qmax, axis, float(grad_factor))


class _LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_factor):
        s = _bcast(scale, x, axis)
        z = _bcast(torch.clamp(torch.round(zero_point.float()), qmin, qmax), x, axis)
        xs = x / s
        v = torch.round(xs + z)
        q = v.clamp(qmin, qmax)
        ctx.save_for_backward(xs, q, v, s, z)
        ctx.qmin, ctx.qmax, ctx.axis, ctx.g = qmin, qmax, axis, grad_factor
        ctx.scale_shape, ctx.zp_shape = scale.shape, zero_point.shape
        ctx.zp_grad = zero_point.is_floating_point()
        return (q - z) * s

    @staticmethod
    def backward(ctx, grad):
        xs, q, v, s, z = ctx.saved_tensors
        below, above = v < ctx.qmin, v > ctx.qmax
        inside = ~(below | above)
        dx = torch.where(inside, grad, 0.0)
        ds = grad * torch.where(inside, q - z - xs, torch.where(below, ctx.qmin - z, ctx.qmax - z)) * ctx.g
        dz = (grad * torch.where(inside, 0.0, -s) * ctx.g) if ctx.zp_grad else None
        return dx, _reduce_to(ds, ctx.axis, ctx.scale_shape), (None if dz is None else
                                                               _reduce_to(dz, ctx.axis, ctx.zp_shape)), None, None, None, None


def _reduce_to(t: torch.Tensor, axis: int | None, shape: torch.Size) -> torch.Tensor:
    """Sum a full-size gradient down to a per-tensor or per-channel parameter's shape."""
    if axis is None or len(shape) == 0 or math.prod(shape) == 1:
        return t.sum().reshape(shape)
    return channel_rows(t, axis).sum(1).reshape(shape)
