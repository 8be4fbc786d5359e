"""QuantConvBn2d while BN statistics are live (the first QAT epochs) against the textbook form."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantization import QuantConfig
from quantization.modules import QuantConvBn2d


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
