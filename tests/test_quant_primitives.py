import doctest

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import quantization.packing
import quantization.primitives as P
from quantization.modules import FakeQuantizer
from quantization.observers import make_observer


def test_doctests():
    for mod in (P, quantization.packing):
        assert doctest.testmod(mod, extraglobs={"torch": torch, "np": np}).failed == 0


def test_per_tensor_matches_torch_at_8_bits():
    torch.manual_seed(0)
    x = torch.randn(1000) * 3
    for symmetric in (True, False):
        s, z = P.choose_qparams(x.min(), x.max(), 8, symmetric)
        qmin, qmax = P.qrange(8, True, True) if symmetric else P.qrange(8, False)
        ours = P.fake_quantize(x, s, z, qmin, qmax)
        ref = torch.fake_quantize_per_tensor_affine(x, s.item(), int(z), qmin, qmax)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_per_channel_matches_torch_at_8_bits():
    torch.manual_seed(1)
    w = torch.randn(16, 8, 3, 3) * torch.linspace(0.1, 2, 16).view(-1, 1, 1, 1)
    lo, hi = P.reduce_minmax(w, 0)
    s, z = P.choose_qparams(lo, hi, 8, symmetric=True)
    ours = P.fake_quantize(w, s, z, -127, 127, axis=0)
    ref = torch.fake_quantize_per_channel_affine(w, s, z, 0, -127, 127)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_ste_gradient_is_one_inside_zero_outside():
    x = torch.tensor([-5.0, -0.3, 0.0, 0.4, 5.0], requires_grad=True)
    P.fake_quantize(x, torch.tensor(0.1), torch.tensor(0), -7, 7).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("bits,symmetric,z", [(4, True, 0), (2, True, 0), (8, True, 0), (4, False, 3), (4, False, 8),
                                             (3, False, 0), (8, False, 131)])
def test_per_tensor_range_path_equals_the_mask_path(bits, symmetric, z, monkeypatch):
    """On a CPU in eager mode a per-tensor fake-quant clamps the codes to [qmin - z, qmax - z] and its
    backward is hardtanh_backward with the range's limits; the bool-mask form (GPU, torch.compile) and
    torch's own op give the same values and the same gradient, codes exactly at qmin / qmax included."""
    qmin, qmax = P.qrange(bits, True, True) if symmetric else P.qrange(bits, False)
    x = _boundary_inputs(0.37, qmin, qmax, z, seed=bits + z)
    s, zt = torch.tensor(0.37), (None if symmetric else torch.tensor(z, dtype=torch.int32))
    up = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    grads, outs = [], []
    for read_ok in (True, False):
        monkeypatch.setattr(P, "_read_ok", lambda t, ok=read_ok: ok)
        xg = x.clone().requires_grad_()
        out = P.fake_quantize(xg, s, zt, qmin, qmax)
        (out * up).sum().backward()
        outs.append(out.detach())
        grads.append(xg.grad)
    xr = x.clone().requires_grad_()
    ref = torch.fake_quantize_per_tensor_affine(xr, 0.37, z, qmin, qmax)
    (ref * up).sum().backward()
    for out, g in zip(outs, grads):
        torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(g, xr.grad, rtol=0, atol=0)
    assert 0 < int((grads[0] == 0).sum()) < len(x)  # both sides of the range are exercised


def test_lsq_scale_gets_scaled_gradient():
    x = torch.randn(100) * 2
    s = torch.tensor(0.3, requires_grad=True)
    P.lsq_fake_quantize(x, s, torch.tensor(0), -7, 7).pow(2).sum().backward()
    assert s.grad is not None and s.grad.abs() > 0


finite = st.floats(-100, 100, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=2, max_size=64), st.integers(2, 8), st.booleans())
def test_properties(values, bits, symmetric):
    x = torch.tensor(values)
    s, z = P.choose_qparams(x.min(), x.max(), bits, symmetric)
    qmin, qmax = P.qrange(bits, True, True) if symmetric else P.qrange(bits, False)
    y = P.fake_quantize(x, s, z, qmin, qmax)
    # values on the integer grid, codes inside the range
    q = P.quantize(x, s, z, qmin, qmax)
    assert q.min() >= qmin and q.max() <= qmax
    torch.testing.assert_close(y, P.dequantize(q, s, z), rtol=0, atol=0)
    # idempotent
    torch.testing.assert_close(P.fake_quantize(y, s, z, qmin, qmax), y, rtol=0, atol=1e-5 * float(s))
    # monotone
    order = torch.argsort(x)
    assert (y[order][1:] >= y[order][:-1] - 1e-6).all()
    # error within half a step inside the representable range
    lo, hi = (qmin - z) * s, (qmax - z) * s
    inside = (x >= lo) & (x <= hi)
    assert ((y - x).abs()[inside] <= s / 2 + 1e-5 * (1 + x.abs()[inside])).all()


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("relu6", [False, True])
def test_activation_quantizer_emits_at_most_2_pow_b_values(bits, relu6):
    x = torch.randn(20000) * 2 + (3 if relu6 else 0)
    if relu6:
        x = x.clamp(0, 6)
    aq = FakeQuantizer(bits, False, signed=not relu6, max_clip=6.0 if relu6 else None)
    aq.observing = True
    aq(x)
    aq.observing = False
    y = aq(torch.randn(50000) * 10)
    assert len(torch.unique(y)) <= 2 ** bits
    if relu6:
        assert int(aq.zero_point) == 0 and float(aq.scale) * (2 ** bits - 1) <= 6.0 + 1e-5


@pytest.mark.parametrize("name", ["minmax", "ema", "percentile", "mse"])
def test_observers_bracket_the_data(name):
    torch.manual_seed(0)
    obs = make_observer(name, None)
    for _ in range(3):
        obs(torch.randn(4096))
    lo, hi = obs.range(4, False, False)
    assert -5 < lo < 0 < hi < 5
    if name in ("percentile", "mse"):  # they clip outliers: narrower than min/max
        mm = make_observer("minmax", None)
        mm(torch.cat([torch.randn(4096), torch.tensor([50.0])]))
        o2 = make_observer(name, None)
        o2(torch.cat([torch.randn(4096), torch.tensor([50.0])]))
        assert o2.range(4, False, False)[1] < mm.range(4, False, False)[1]


@pytest.mark.parametrize("name", ["minmax", "ema", "percentile", "mse"])
def test_a_weight_range_is_recomputed_each_step_with_every_observer(name):
    """A QAT weight quantizer observes each step's weight afresh: the second step's scale is the first
    step's (same weight), with every observer. (The percentile observer kept its batch count through
    reset(), so from the second step on it averaged with the reset +-inf: scale 1e-8, weights 0.)"""
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    fq = FakeQuantizer(4, True, axis=0, channels=6, observer=name, dynamic=True)
    first = fq(w).clone()
    s1 = fq.scale.clone()
    assert torch.equal(fq(w), first) and torch.equal(fq.scale, s1) and bool((s1 > 1e-3).all())
    fq(w * 2)  # the range follows the weight, nothing is remembered from before
    assert torch.allclose(fq.scale, 2 * s1)
    # calibrating an activation quantizer again (reset, then new batches) forgets the first calibration
    obs = make_observer(name, None)
    obs(torch.randn(4096) * 10)
    obs.reset()
    obs(torch.randn(4096))
    lo, hi = obs.range(8, False, False)
    assert -5 < lo < 0 < hi < 5


def test_per_channel_observer_shape():
    obs = make_observer("mse", 0)
    obs(torch.randn(8, 4, 3, 3))
    lo, hi = obs.range(4, True, True)
    assert lo.shape == hi.shape == (8,)


def _boundary_inputs(scale: float, qmin: int, qmax: int, z: int, n: int = 400, seed: int = 0) -> torch.Tensor:
    """Random values spanning beyond the range plus values whose code is exactly qmin, qmax, and the
    grid points just outside; no value sits on a rounding tie."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, generator=g) * (qmax - qmin + 6) + qmin - 3 - z) * scale
    frac = (x / scale) - torch.floor(x / scale)
    x = torch.where((frac - 0.5).abs() < 1e-3, x + 0.1 * scale, x)  # keep off .5 ties
    edges = torch.tensor([qmin - z, qmax - z, qmin - z - 1, qmax - z + 1, qmin - z + 0.3, qmax - z - 0.3]) * scale
    return torch.cat([x, edges])


@pytest.mark.parametrize("bits, signed", [(2, True), (4, True), (4, False), (8, True)])
def test_lsq_gradients_match_torch_learnable_fake_quant_per_tensor(bits, signed):
    qmin, qmax = P.qrange(bits, signed, True) if signed else P.qrange(bits, False)
    z0 = 0 if signed else 2
    x = _boundary_inputs(0.37, qmin, qmax, z0, seed=bits).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    s = torch.tensor([0.37], requires_grad=True)
    s_ref = s.detach().clone().requires_grad_()
    z = torch.tensor([float(z0)], requires_grad=True)
    z_ref = z.detach().clone().requires_grad_()
    gf = 0.125
    out = P.lsq_fake_quantize(x, s, z, qmin, qmax, None, grad_factor=gf)
    ref = torch._fake_quantize_learnable_per_tensor_affine(x_ref, s_ref, z_ref, qmin, qmax, gf)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    up = torch.randn(len(x), generator=torch.Generator().manual_seed(1))
    (out * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)  # incl. codes exactly at qmin / qmax
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-4, atol=1e-5)
    at_bounds = (torch.round(x.detach() / s.detach() + z0) == qmin) | (torch.round(x.detach() / s.detach() + z0) == qmax)
    assert at_bounds.sum() >= 2 and (x.grad[at_bounds] == up[at_bounds]).all()  # the bounds pass the gradient


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lsq_gradients_match_torch_learnable_fake_quant_per_channel(bits):
    qmin, qmax = P.qrange(bits, True, True)
    scales = torch.tensor([0.05, 0.2, 0.7])
    w = torch.stack([_boundary_inputs(float(sc), qmin, qmax, 0, n=94, seed=i).reshape(4, 25) for i, sc in enumerate(scales)])
    w = w.requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    s, s_ref = scales.clone().requires_grad_(), scales.clone().requires_grad_()
    z, z_ref = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    out = P.lsq_fake_quantize(w, s, z, qmin, qmax, axis=0, grad_factor=0.5)
    ref = torch._fake_quantize_learnable_per_channel_affine(w_ref, s_ref, z_ref, 0, qmin, qmax, 0.5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    up = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    (out * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-4, atol=1e-4)
    # every in-range weight gets a gradient, those at the extreme codes included (21% of them at W2 before)
    codes = torch.round(w.detach() / scales.reshape(-1, 1, 1))
    inside = (codes >= qmin) & (codes <= qmax)
    assert (w.grad[inside] == up[inside]).all()


def test_the_compiled_quantizer_kernel_gives_the_eager_values_and_gradients(monkeypatch):
    """Large CPU activations go through one torch.compile'd kernel (round, clamp, scale in one pass): the
    same values and gradients as the eager passes, for the fused ReLU6 and the per-tensor signed quantizer."""
    torch.manual_seed(0)
    x = torch.randn(16, 8, 24, 24) * 3
    up = torch.randn_like(x)
    s, z = torch.tensor(0.37), torch.tensor(5, dtype=torch.int32)

    def run(fused: bool):
        monkeypatch.setattr(P, "COMPILED_MIN_NUMEL", 1 if fused else x.numel() + 1)
        outs = []
        for f in (lambda v: P.fake_quantize_relu6(v, s, 15), lambda v: P.fake_quantize(v, s, z, 0, 15),
                  lambda v: P.fake_quantize(v, s, None, -7, 7)):
            xg = x.clone().requires_grad_()
            out = f(xg)
            (out * up).sum().backward()
            with torch.no_grad():  # evaluation: the inference path, no autograd function
                inference = f(x.clone())
            outs.append((out.detach(), xg.grad, inference))
        return outs

    eager = run(False)
    fused = run(True)
    assert P._compiled_kernel not in (None, False)  # the kernel was built and used
    for (a, ga, ia), (b, gb, ib) in zip(eager, fused):
        assert torch.equal(a, b) and torch.equal(ga, gb) and torch.equal(ia, a) and torch.equal(ib, a)
    assert len({a.unique().numel() for a, _, _ in eager}) > 1  # three different grids
    # inference with a zero-point: the clamped codes equal quantize -> dequantize's
    with torch.no_grad():
        assert torch.equal(P.fake_quantize(x, s, z, 0, 15), P.dequantize(P.quantize(x, s, z, 0, 15), s, z))


def test_without_a_compiler_the_quantizer_kernel_falls_back_to_eager(monkeypatch):
    """Where inductor cannot build the kernel (no C++ compiler, say) one warning, then the eager passes."""
    def no_compiler(fn, **kw):
        def fail(*a):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(P, "_compiled_kernel", None)
    monkeypatch.setattr(P, "COMPILED_MIN_NUMEL", 1)
    monkeypatch.setattr(P.torch, "compile", no_compiler)
    x = torch.randn(1000)
    with pytest.warns(UserWarning, match="quantizers run eagerly"):
        out = P.clamped_codes_times_scale(x, 0.1, -7, 7)
    assert torch.equal(out, (x / 0.1).round().clamp(-7, 7) * 0.1) and P._compiled_kernel is False
    P.clamped_codes_times_scale(x, 0.1, -7, 7)  # no second warning: it stays eager
