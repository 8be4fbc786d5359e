"""QuantConvBn2d while BN statistics are live (the first QAT epochs) against the textbook form, and the
ReLU6 that prepare() fuses into the next activation quantizer against the model without the fusion."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantization import QuantConfig, api, calibrate, prepare, primitives, quant_layers
from quantization.modules import QuantConvBn2d, _FoldStep
from quantization.primitives import fake_quantize, fake_quantize_relu6
from trainer.model import MobileNetV2


def _layer(w_bits: int, groups: int = 1, bias: bool = False, momentum: float | None = 0.1):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(8, momentum=momentum)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.2, 3.0)
        bn.weight.uniform_(0.3, 2.0)
        bn.bias.uniform_(-0.5, 0.5)
    plan = SimpleNamespace(w_bits=w_bits, a_bits=32, w_granularity="per_channel")
    return QuantConvBn2d(conv, bn, plan, QuantConfig(w_bits=min(w_bits, 8), method="qat")).train()


def _reference(layer: QuantConvBn2d, x: torch.Tensor, bn: nn.BatchNorm2d | None = None):
    """BN(conv(x, q(w * sf)) / sf), by default with a copy of the BN: the QAT conv+BN of Jacob et al.
    and Krishnamoorthi."""
    bn, conv = bn or copy.deepcopy(layer.bn).train(), layer.conv
    sf = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight * sf.reshape(-1, 1, 1, 1)
    w = layer.wq(w) if layer.wq is not None else w
    y = F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups) / sf.reshape(1, -1, 1, 1)
    if conv.bias is not None:
        y = y + conv.bias.reshape(1, -1, 1, 1)
    return bn(y), bn


@pytest.mark.parametrize("w_bits, groups, bias, momentum", [(32, 1, False, 0.1), (4, 1, False, 0.1),
                                                            (3, 8, True, 0.1), (8, 1, True, None)],
                         ids=["fp32", "w4", "w3-depthwise-bias", "w8-cumulative-momentum"])
def test_live_bn_forward_and_running_stats_match_the_textbook_form(w_bits, groups, bias, momentum):
    layer = _layer(w_bits, groups, bias, momentum)
    x = torch.randn(16, 8, 6, 6) * 2 + 0.3
    for _ in range(3):  # several steps: the running statistics feed the next step's sf
        ref, ref_bn = _reference(layer, x)
        out = layer(x)
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(layer.bn.running_mean, ref_bn.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.bn.running_var, ref_bn.running_var, atol=1e-5, rtol=1e-5)
        assert int(layer.bn.num_batches_tracked) == int(ref_bn.num_batches_tracked)
        x = x * 1.3 - 0.1


def test_live_bn_gradients_match_the_textbook_form_through_the_ste():
    layer = _layer(4)
    x = torch.randn(16, 8, 6, 6)
    before = copy.deepcopy(layer.bn.state_dict())
    ref, _ = _reference(layer, x, layer.bn)
    (ref * torch.linspace(-1, 1, ref.numel()).reshape(ref.shape)).sum().backward()
    layer.bn.load_state_dict(before)  # the same running statistics for the second pass
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    assert set(ref_grads) == {"conv.weight", "bn.weight", "bn.bias"}
    for n, p in layer.named_parameters():  # gamma included: it also learns through q(w * sf)
        torch.testing.assert_close(p.grad, ref_grads[n], atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("frozen", [False, True], ids=["bn-live", "bn-frozen"])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("w_bits", [2, 4, 8])
def test_fold_and_quantize_in_one_node_equals_the_general_weight_path(granularity, w_bits, frozen):
    """The QAT weight path's one autograd node (``FakeQuantizer.fold_quantize``) gives what folding and then
    the weight quantizer give: the same values, scales, observed range and gradients for w and gamma (BN
    live: through w * sf; frozen: ``_FoldStep``'s, gamma none), gamma 0 in one channel included;
    quantizers of another kind (asymmetric, percentile, LSQ) decline."""
    torch.manual_seed(1)
    plan = SimpleNamespace(w_bits=w_bits, a_bits=32, w_granularity=granularity)
    layer = QuantConvBn2d(nn.Conv2d(8, 4, 3, bias=False), nn.BatchNorm2d(8), plan, QuantConfig(w_bits=w_bits, method="qat"))
    w = (torch.randn(8, 4, 3, 3) * torch.linspace(0.1, 2, 8).reshape(-1, 1, 1, 1)).requires_grad_()
    gamma = torch.linspace(-1.5, 2.0, 8).index_fill(0, torch.tensor([5]), 0.0).requires_grad_()
    var = torch.rand(8) * 3 + 0.05
    g = torch.randn(8, 4, 3, 3)
    ref_q = copy.deepcopy(layer.wq)
    sf_ref = (gamma / torch.sqrt(var + 1e-5)).reshape(-1, 1, 1, 1)
    ref = ref_q(_FoldStep.apply(w, sf_ref.detach()) if frozen else w * sf_ref)
    ref_gw, ref_gg = torch.autograd.grad((ref * g).sum(), (w, gamma), allow_unused=True)
    out, sf = layer.wq.fold_quantize(w, gamma, var, 1e-5, frozen=frozen)
    gw, gg = torch.autograd.grad((out * g).sum(), (w, gamma), allow_unused=True)
    assert (gg is None) == frozen == (ref_gg is None)
    assert torch.equal(out, ref) and torch.equal(layer.wq.scale, ref_q.scale)
    assert torch.equal(layer.wq.observer.min_val, ref_q.observer.min_val)
    assert torch.equal(layer.wq.observer.max_val, ref_q.observer.max_val)
    torch.testing.assert_close(sf, gamma.detach() / torch.sqrt(var + 1e-5))
    assert torch.equal(gw, ref_gw)  # the same arithmetic: a chaotic fine-tuning takes the same path
    if not frozen:
        torch.testing.assert_close(gg, ref_gg)
    assert len(out.unique()) >= 3  # a real grid: not all weights rounded to zero
    for other in (dict(w_symmetric=False), dict(w_observer="percentile"), dict(method="lsq")):
        cfg = QuantConfig(**{"w_bits": w_bits, "method": "qat", **other})
        assert QuantConvBn2d(nn.Conv2d(8, 4, 3, bias=False), nn.BatchNorm2d(8), plan, cfg).wq.fold_quantize(
            w, gamma, var, 1e-5) is None


@pytest.mark.parametrize("frozen", [False, True], ids=["bn-live", "bn-frozen"])
def test_the_one_node_weight_path_trains_bit_for_bit_as_the_general_path(frozen, monkeypatch):
    """Several SGD steps of a 2-bit layer through ``fold_quantize`` and through the general path (fold, then
    the weight quantizer; forced by making ``fold_quantize`` decline): the same outputs, weights and running
    statistics to the bit, so a fine-tuning on the edge of diverging takes the same path either way."""
    from quantization.modules import FakeQuantizer

    def run():
        layer = _layer(2)
        layer.bn_frozen = frozen
        opt = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(3)
        outs = []
        for _ in range(4):
            out = layer(torch.randn(8, 8, 6, 6))
            opt.zero_grad()
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            opt.step()
            outs.append(out.detach())
        return outs, [t.detach().clone() for t in (layer.conv.weight, layer.bn.weight, layer.bn.bias,
                                                   layer.bn.running_mean, layer.bn.running_var)]
    fused = run()
    monkeypatch.setattr(FakeQuantizer, "fold_quantize", lambda self, *a, **k: None)
    general = run()
    for a, b in zip(fused[0] + fused[1], general[0] + general[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("w_bits, bias", [(32, False), (4, False), (4, True)])
@pytest.mark.parametrize("k", [1.0, 0.05], ids=["sigma-as-is", "sigma-20x-smaller"])
def test_frozen_bn_qat_trains_the_folded_conv_whatever_the_bn_scale(w_bits, bias, k):
    """With BN frozen, SGD (momentum, several steps) on the QAT layer moves the folded weight and bias
    exactly as SGD on a plain conv holding them: the step does not grow as sigma shrinks (k: the same
    function with conv weights and sigma k times the original). A channel with gamma 0 stays put."""
    layer = _layer(w_bits, bias=bias)
    with torch.no_grad():
        layer.conv.weight.mul_(k)
        layer.bn.running_mean.mul_(k)
        layer.bn.running_var.mul_(k * k)
        if bias:
            layer.conv.bias.mul_(k)
        layer.bn.weight[3] = 0.0
    layer.bn_frozen = True
    w0, b0 = (t.detach().clone() for t in layer.folded())
    ref = nn.Conv2d(8, 8, 3, padding=1, bias=True)
    with torch.no_grad():
        ref.weight.copy_(w0)
        ref.bias.copy_(b0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 8, 6, 6)
        target = torch.randn(4, 8, 6, 6)
        for m, o in ((layer, opt), (ref, ref_opt)):
            o.zero_grad()
            w = layer.wq(ref.weight) if m is ref and layer.wq is not None else None
            out = F.conv2d(x, w, ref.bias, padding=1) if w is not None else m(x)
            ((out - target) ** 2).mean().backward()
            o.step()
    assert layer.bn.weight.grad is None and (layer.conv.bias is None or layer.conv.bias.grad is None)
    w1, b1 = (t.detach() for t in layer.folded())
    assert not torch.allclose(w1, w0)
    live = torch.arange(8) != 3
    for got, want, start in ((w1, ref.weight, w0), (b1, ref.bias, b0)):  # the same step, up to rounding flips
        step, ref_step = (got - start)[live], (want.detach() - start)[live]
        assert (step - ref_step).norm() < 0.01 * ref_step.norm()
    assert torch.isfinite(layer.conv.weight).all()
    torch.testing.assert_close(w1[3], w0[3])


@pytest.mark.parametrize("tensor_bounds", [False, True], ids=["cpu-eager", "tensor-bounds-as-on-gpu-or-compiled"])
@pytest.mark.parametrize("s, bits", [(0.05, 4), (0.5, 4), (0.03, 8), (1.7, 2), (6 / 255, 8)],
                         ids=["fine", "s*qmax>6", "8bit", "2bit", "clip-at-6"])
def test_fake_quantize_relu6_equals_relu6_then_fake_quantize(s, bits, tensor_bounds, monkeypatch):
    # on a CPU in eager mode the bounds are numbers and the backward is hardtanh_backward; on a GPU or
    # under torch.compile they stay tensors and the backward uses a saved mask: both must be exact
    monkeypatch.setattr(primitives, "_read_ok", lambda t: not tensor_bounds)
    torch.manual_seed(bits)
    qmax, scale, zero = 2 ** bits - 1, torch.tensor(s), torch.tensor(0, dtype=torch.int32)
    base = torch.cat([torch.linspace(-2, 9, 2001), torch.randn(4000) * 4 + 3,
                      torch.tensor([0.0, 6.0, s * (qmax + 0.5), -s / 3])])
    g = torch.randn_like(base)
    x_ref, x = base.clone().requires_grad_(), base.clone().requires_grad_()
    ref = fake_quantize(F.relu6(x_ref), scale, zero, 0, qmax)
    out = fake_quantize_relu6(x, scale, qmax)
    assert torch.equal(out, ref)
    ref.backward(g)
    out.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    with torch.no_grad():  # the inference path too
        assert torch.equal(fake_quantize_relu6(base, scale, qmax), fake_quantize(F.relu6(base), scale, zero, 0, qmax))


def _fused_and_plain(width: float, cfg: QuantConfig, monkeypatch):
    torch.manual_seed(0)
    m = MobileNetV2(num_classes=10, width=width)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_var.uniform_(0.5, 2)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.6)
    fused = prepare(m, cfg)
    with monkeypatch.context() as mp:
        mp.setattr(api, "_fuse_relu6", lambda *a: None)
        plain = prepare(m, cfg)
    x = torch.randn(8, 3, 32, 32)
    calibrate(fused, [x], 1)
    calibrate(plain, [x], 1)
    return fused, plain, x


@pytest.mark.parametrize("width", [0.25, 0.5], ids=["block0-residual", "no-block0-residual"])
@pytest.mark.parametrize("method", ["qat", "lsq"])
def test_prepare_fuses_relu6_into_the_next_quantizer_without_changing_the_model(width, method, monkeypatch):
    fused, plain, x = _fused_and_plain(width, QuantConfig(w_bits=4, a_bits=4, method=method), monkeypatch)
    relu6 = lambda q: sum(isinstance(mod, nn.ReLU6) for mod in q.modules())  # noqa: E731
    n_fused = sum(m.aq.fused_relu6 for m in quant_layers(fused).values() if m.aq is not None)
    assert n_fused > 30 and relu6(fused) == relu6(plain) - n_fused
    # at width 0.25 block 0 adds its input (the stem's ReLU6 output) back: that ReLU6 must stay
    assert isinstance(fused.stem.act, nn.ReLU6) == fused.blocks[0].use_res
    with torch.no_grad():
        assert torch.equal(fused.eval()(x), plain.eval()(x))
    fused.train(), plain.train()
    torch.manual_seed(1)
    out_f = fused(x)
    torch.manual_seed(1)
    out_p = plain(x)
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
    out_f.square().sum().backward()
    out_p.square().sum().backward()
    grads = dict(plain.named_parameters())
    for n, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("w_symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_a_qat_layer_traces_as_one_graph_for_torch_compile(w_symmetric):
    """Nothing in a QAT layer's training step reads a tensor's value (no graph break): BN live and frozen,
    the fused ReLU6 + activation quantizer, per-channel weight ranges recomputed each step, zero-points."""
    torch.manual_seed(0)
    cfg = QuantConfig(w_bits=2, a_bits=4, method="qat", w_symmetric=w_symmetric)
    plan = SimpleNamespace(w_bits=2, a_bits=4, w_granularity="per_channel")
    layer = QuantConvBn2d(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), plan, cfg, input_relu6=True)
    layer.aq.fused_relu6, layer.aq.enabled = True, True
    x = torch.randn(4, 8, 6, 6)
    layer.aq.observe(F.relu6(x))
    layer.aq.observing = False
    eager = copy.deepcopy(layer).train()
    compiled = torch.compile(layer.train(), backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    for frozen in (False, True):
        layer.bn_frozen = eager.bn_frozen = frozen
        out, ref = compiled(x), eager(x)
        torch.testing.assert_close(out, ref)
        out.square().sum().backward()
        ref.square().sum().backward()
        torch.testing.assert_close(layer.conv.weight.grad, eager.conv.weight.grad)
        torch.testing.assert_close(layer.bn.running_var, eager.bn.running_var)


def test_biases_sit_on_the_int32_grid_of_input_times_weight_scale():
    """What an integer kernel adds to its int32 accumulator: the folded bias in units of input scale x weight
    scale (per channel). Layers whose input is not quantized keep the float bias."""
    torch.manual_seed(0)
    m = MobileNetV2(num_classes=10, width=0.25)
    q = prepare(m, QuantConfig(w_bits=4, a_bits=8, overrides=({"pattern": "blocks.2.*", "a_bits": 32},)))
    calibrate(q, [torch.randn(8, 3, 32, 32)])
    gridded = 0
    for name, layer in quant_layers(q.eval()).items():
        _, b = layer.quantized_weight_bias()
        s = layer.bias_scale()
        if name.startswith("blocks.2."):
            assert s is None
            continue
        codes = b / s
        assert torch.equal(codes, torch.round(codes)), name
        folded = layer.folded()[1]
        assert (b - folded).abs().max() <= 0.5 * s.max() + 1e-6  # moved by at most half a step
        gridded += 1
    assert gridded > 20


def test_old_packed_files_hold_models_without_output_quantizers():
    from quantization.packing import read_config
    old = QuantConfig().to_dict(procedure=False)
    del old["quantize_outputs"]
    assert read_config(old).quantize_outputs is False and read_config(QuantConfig().to_dict()).quantize_outputs
    torch.manual_seed(0)
    m = MobileNetV2(num_classes=10, width=0.25)
    plain = prepare(m, QuantConfig(quantize_outputs=False))
    assert not any(layer.oq is not None for layer in quant_layers(plain).values())
    q = prepare(m, QuantConfig())
    with_oq = [n for n, layer in quant_layers(q).items() if layer.oq is not None]
    assert len(with_oq) == sum(b.use_res for b in m.blocks) + 1  # each residual branch + the pooled head
