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


def test_per_channel_observer_shape():
    obs = make_observer("mse", 0)
    obs(torch.randn(8, 4, 3, 3))
    lo, hi = obs.range(4, True, True)
    assert lo.shape == hi.shape == (8,)
