import pytest
import torch

from trainer.model import MobileNetV2, count_params, model_from_meta, model_meta


def test_full_width_parameter_count_matches_reference():
    n = count_params(MobileNetV2(num_classes=10, width=1.0))
    assert 2_200_000 <= n <= 2_300_000
    assert n == 2_236_682


@pytest.mark.parametrize("width", [0.25, 0.5, 1.0])
def test_batch_one_shape_and_finite(width):
    m = MobileNetV2(num_classes=10, width=width).eval()
    out = m(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_layer_names_are_stable():
    names = {n for n, _ in MobileNetV2(width=0.25).named_modules()}
    for n in ["stem.conv", "stem.bn", "blocks.0.dw.conv", "blocks.0.project.conv", "blocks.1.expand.conv",
              "blocks.16.project.conv", "head.conv", "classifier"]:
        assert n in names
    assert "blocks.0.expand.conv" not in names  # t == 1: no expansion
    assert "blocks.17.dw.conv" not in names


def test_every_conv_is_followed_by_bn_and_cifar_strides():
    m = MobileNetV2(width=0.5)
    convs = [n for n, x in m.named_modules() if isinstance(x, torch.nn.Conv2d)]
    bns = {n for n, x in m.named_modules() if isinstance(x, torch.nn.BatchNorm2d)}
    assert all(c.replace(".conv", ".bn") in bns for c in convs)
    assert m.stem.conv.stride == (1, 1) and m.blocks[1].dw.conv.stride == (1, 1)
    feats = m.head(m.blocks(m.stem(torch.randn(1, 3, 32, 32))))
    assert feats.shape[-2:] == (4, 4)  # three stride-2 stages: 32 -> 4


def test_meta_round_trip():
    m = MobileNetV2(num_classes=7, width=0.5, dropout=0.1)
    m2 = model_from_meta(model_meta(m))
    m2.load_state_dict(m.state_dict())  # strict: raises if the rebuilt network has other tensors or shapes
    assert m2.num_classes == 7 and m2.width == 0.5 and m2.dropout.p == 0.1
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m.eval()(x), m2.eval()(x), rtol=0, atol=0)


def test_strided_depthwise_conv_computes_in_fp32_under_cpu_bf16_autocast(monkeypatch):
    """Only strided depthwise convs leave bf16 (their CPU backward is slow in bf16): same result as the
    FP32 conv rounded to bf16, gradients as in FP32; every other conv, and FP32 runs, unchanged; the QAT
    layers wrapping the model's convs take the same path."""
    from torch.nn import functional as F

    from quantization import QuantConfig, calibrate, prepare
    from trainer.model import Conv2d
    torch.manual_seed(0)
    x = torch.randn(4, 64, 16, 16, requires_grad=True)
    dw = Conv2d(64, 64, 3, 2, 1, groups=64, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dw(x)
        y_bf16 = F.conv2d(x, dw.weight, None, 2, 1, 1, 64)  # what autocast alone computes
    ref = F.conv2d(x, dw.weight, None, 2, 1, 1, 64)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref.to(torch.bfloat16))
    assert not torch.equal(y, y_bf16)  # bf16 inputs round differently: the FP32 path really ran
    g = torch.randn_like(ref).to(torch.bfloat16).float()  # the incoming gradient passes the bf16 output
    gx, gw = torch.autograd.grad(y.float(), (x, dw.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, dw.weight), g)
    assert torch.allclose(gx, rx, rtol=1e-5, atol=1e-6) and torch.allclose(gw, rw, rtol=1e-4, atol=1e-4)
    for conv in (Conv2d(64, 64, 3, 1, 1, groups=64, bias=False), Conv2d(64, 32, 1, 2, bias=False)):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # stride 1, or not depthwise: plain autocast
            assert torch.equal(conv(x), F.conv2d(x, conv.weight, None, conv.stride, conv.padding, 1, conv.groups))
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, None, conv.stride, conv.padding, 1, conv.groups))
    assert torch.equal(dw(x), ref)  # no autocast: FP32 as always

    m = MobileNetV2(num_classes=3, width=0.25)
    q = prepare(m.train(), QuantConfig(w_bits=8, a_bits=8, method="qat"))
    xi = torch.randn(2, 3, 32, 32)
    calibrate(q, [xi])
    calls, conv = [], F.conv2d
    def spy(inp, w, *args):
        calls.append((args[-1] > 1 and args[1] not in (1, (1, 1)), inp.dtype, torch.is_autocast_enabled("cpu")))
        return conv(inp, w, *args)
    monkeypatch.setattr(F, "conv2d", spy)
    for model in (m, q):
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(xi).sum().backward()
        assert sum(c[0] for c in calls) == 3 and len(calls) == 52  # 3 strided depthwise among 52 convs
        assert all(c[1:] == ((torch.float32, False) if c[0] else (c[1], True)) for c in calls)
