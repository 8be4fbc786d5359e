"""Residual adds of traced networks (quantization/graph.py): both inputs and the sum on a grid, one quantizer for
a tensor that several layers read, the packed file and the ONNX export (QLinearAdd) agree with the fake-quant
model; what cannot be rewritten keeps FP32 adds; packed files of format version 2 still load; networks from
torchvision (their activations and methods) export and onnxruntime agrees with them."""
from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F

from quantization import QuantConfig, calibrate, prepare
from quantization.api import freeze, quant_layers
from quantization.graph import _Tracer
from quantization.modules import Requantize, SharedInput
from trainer.resnet import ResNet20


def _bn_stats(m: nn.Module) -> nn.Module:
    """Non-trivial BN statistics (a fresh BN is the identity), so folding and quantizing change something."""
    g = torch.Generator().manual_seed(0)
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.copy_(torch.rand(b.num_features, generator=g) * 0.2 - 0.1)
            b.running_var.copy_(torch.rand(b.num_features, generator=g) + 0.5)
            b.bias.data.copy_(torch.rand(b.num_features, generator=g) * 0.2 - 0.1)
    return m.eval()


def _calibrated(m: nn.Module, cfg: QuantConfig) -> nn.Module:
    torch.manual_seed(0)
    q = prepare(m, cfg)
    calibrate(q, [torch.randn(16, 3, 32, 32)])
    return q.eval()


def _add_tensors(q: nn.Module, x: torch.Tensor) -> list[tuple]:
    """(left input, right input, sum after its activation and quantizer) of every add, running the prepared
    model's graph."""
    gm = fx.GraphModule(q, _Tracer().trace(q))
    seen: dict = {}
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add]

    class Record(fx.Interpreter):
        def run_node(self, n):
            seen[n] = super().run_node(n)
            return seen[n]

    with torch.no_grad():
        Record(gm).run(x)
    modules = dict(gm.named_modules())
    out = []
    for a in adds:
        (act,) = a.users  # the ReLU; then the quantizer that writes the sum, where there is one
        q = [u for u in act.users if u.op == "call_module" and isinstance(modules[u.target], SharedInput)]
        out.append((seen[a.args[0]], seen[a.args[1]], seen[q[0] if q else act]))
    return out


def _distinct(t: torch.Tensor) -> int:
    return t.unique().numel()


def test_resnet20_adds_read_and_write_quantized_tensors():
    """W8A4, first conv and classifier FP32: the 8 adds whose sum a quantized conv reads take two tensors of at
    most 16 values and give one; the last (read by pooling and the FP32 classifier) stays FP32. Each block's
    first conv reads the shared input; the downsampling blocks' sliced, zero-padded shortcut is requantized."""
    q = _calibrated(_bn_stats(ResNet20()), QuantConfig(w_bits=8, a_bits=4, keep_fp32=("stem.conv", "classifier")))
    assert type(q).__name__ == "ResNet20" and isinstance(q, ResNet20)
    layers = quant_layers(q)
    assert [n for n, m in layers.items() if m.oq is not None] == [f"layers.{i}.conv2" for i in range(8)]
    assert all(layers[f"layers.{i}.conv1"].aq_outside for i in range(9))
    extra = [m for n, m in q.named_children() if n.startswith("bitsearch_q")]
    assert sum(type(m) is SharedInput for m in extra) == 9 and sum(type(m) is Requantize for m in extra) == 2
    sums = _add_tensors(q, torch.randn(4, 3, 32, 32))
    assert len(sums) == 9
    for left, right, out in sums[:8]:
        assert max(_distinct(left), _distinct(right), _distinct(out)) <= 16
    assert _distinct(sums[8][0]) > 16  # the last block's branch output: FP32


def _packed_and_onnx(q: nn.Module, build, tmp_path) -> tuple[nn.Module, dict, object]:
    """The packed model (written, read back with ``build`` making the FP32 network: it must compute what ``q``
    does), the op counts onnxruntime runs for its ONNX export, and that file's path."""
    from pipeline.export import _save, optimized_ops, to_onnx
    from quantization.packing import convert, load_packed, save_packed
    freeze(q)
    save_packed(tmp_path / "m.bsq", convert(q, {"arch": "resnet20", "num_classes": 10}))
    back = load_packed(tmp_path / "m.bsq", build)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back(x), q(x), atol=1e-4, rtol=1e-4)
    onnx_path = _save(to_onnx(back, mean=(0.5,) * 3, std=(0.25,) * 3)[0], tmp_path / "m.onnx")
    return back, optimized_ops(onnx_path), onnx_path


def test_the_packed_file_and_onnx_compute_what_the_fake_quant_model_does(tmp_path):
    from pipeline.export import run_onnx
    from trainer.zoo import model_from_meta
    q = _calibrated(_bn_stats(ResNet20()), QuantConfig(w_bits=8, a_bits=8, keep_fp32=("stem.conv", "classifier")))
    back, ops, onnx_path = _packed_and_onnx(q, model_from_meta, tmp_path)
    assert ops.get("QLinearAdd") == 8 and ops.get("QLinearConv") == 17, ops  # of 18 quantized convs
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        ref = back(x)
    logits = run_onnx(onnx_path, x * 0.25 + 0.5)
    assert (logits.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    assert (logits - ref).abs().max() <= 0.05 * ref.abs().max()


def test_torchvisions_resnet18_runs_its_adds_as_integer_kernels(tmp_path):
    """`out += identity`, one ReLU module called twice per block, a max-pooled stem read by the first block's
    conv and its add, projection shortcuts reading the block input with conv1: 7 of 8 adds and 18 of 20 convs
    (the FP32 first conv, the last block's conv2) run as integer kernels."""
    import torchvision
    torch.manual_seed(0)
    m = _bn_stats(torchvision.models.resnet18(num_classes=10))
    q = _calibrated(m, QuantConfig(w_bits=8, a_bits=8, keep_fp32=("conv1", "fc")))
    layers = quant_layers(q)
    assert all(layers[f"layer{i}.0.downsample.0"].aq is layers[f"layer{i}.0.conv1"].aq for i in (2, 3, 4))
    _, ops, _ = _packed_and_onnx(q, lambda meta: m, tmp_path)
    assert ops.get("QLinearAdd") == 7 and ops.get("QLinearConv") == 18 and ops.get("Add", 0) == 0, ops


@pytest.mark.parametrize("name, adds", [
    ("mobilenet_v3_small", 6),  # Hardswish, Hardsigmoid squeeze-excitation (x * scale), adds
    ("regnet_x_400mf", 21),     # 22 adds (the last before the FP32 classifier stays float), x.flatten(start_dim=1)
    ("efficientnet_b0", 0),     # SiLU, sigmoid excitation, stochastic depth: its forward hands self.training to a
])                              # function, so training and evaluation trace differently and its adds stay FP32
def test_torchvision_networks_export_and_onnxruntime_agrees(name, adds, tmp_path):
    import torchvision
    from pipeline.export import run_onnx
    torch.manual_seed(0)
    m = _bn_stats(getattr(torchvision.models, name)(num_classes=10))
    q = _calibrated(m, QuantConfig(w_bits=8, a_bits=8, keep_fp32=("@first", "@last")))
    back, ops, onnx_path = _packed_and_onnx(q, lambda meta: m, tmp_path)
    assert ops.get("QLinearAdd", 0) == adds and ops.get("QLinearConv", 0) > 0, ops
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = back(x)
    logits = run_onnx(onnx_path, x * 0.25 + 0.5)
    assert (logits - ref).abs().max() <= 0.05 * ref.abs().max() and (logits.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


class _Block(nn.Module):
    """A basic block; with ``down``, a 1x1 projection shortcut that reads the block input with conv1."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, 2 if down else 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout)) if down else nn.Identity()

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.short(x))


class _Net(nn.Module):
    def __init__(self, branch_on_training: bool = False):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.same, self.down = _Block(8, 8, False), _Block(8, 16, True)
        self.head, self.fc = nn.Conv2d(16, 16, 1), nn.Linear(16, 10)  # the first and last layers stay FP32
        self.branch_on_training = branch_on_training

    def forward(self, x):
        x = self.down(self.same(F.relu(self.bn(self.stem(x)))))
        if self.branch_on_training and self.training:
            x = x * 1.0
        return self.fc(self.head(x).mean((2, 3)))


def test_a_projection_shortcut_shares_the_block_inputs_quantizer():
    """The first block's sum is read by the next block's conv1 and its projection shortcut: one quantizer, one
    set of codes for both; the projection's output is the add's other quantized input."""
    q = _calibrated(_bn_stats(_Net()), QuantConfig(w_bits=8, a_bits=4))
    layers = quant_layers(q)
    conv1, short = layers["down.conv1"], layers["down.short.0"]
    assert conv1.aq is short.aq and conv1.aq_outside and short.aq_outside
    assert [n for n, m in layers.items() if m.oq is not None] == ["same.conv2", "down.conv2", "down.short.0"]
    sums = _add_tensors(q, torch.randn(4, 3, 32, 32))
    assert len(sums) == 2 and all(max(map(_distinct, t)) <= 16 for t in sums)


def test_a_forward_that_branches_on_training_keeps_fp32_adds():
    q = _calibrated(_bn_stats(_Net(branch_on_training=True)), QuantConfig(w_bits=8, a_bits=4))
    assert type(q) is _Net and not any(n.startswith("bitsearch_q") for n, _ in q.named_children())
    assert all(m.oq is None for m in quant_layers(q).values())


def test_a_graph_that_cannot_be_rewritten_keeps_fp32_adds_with_a_warning(monkeypatch):
    import quantization.graph as graph

    def fails(model):
        raise RuntimeError("an unusual forward")
    monkeypatch.setattr(graph, "_trace", fails)
    with pytest.warns(UserWarning, match="ResNet20: residual adds stay FP32 .*RuntimeError: an unusual forward"):
        q = _calibrated(_bn_stats(ResNet20()), QuantConfig(w_bits=8, a_bits=4))
    assert type(q) is ResNet20 and all(m.oq is None and not m.aq_outside for m in quant_layers(q).values())
    assert all(m.aq is not None for n, m in quant_layers(q).items() if n.startswith("layers."))  # quantized as asked


def test_a_version_2_file_of_a_traced_model_loads_with_fp32_adds(tmp_path, monkeypatch):
    """Files written before traced adds were quantized (format version 2) hold no output quantizers: they load
    as the model they were written from."""
    import quantization.packing as packing
    from trainer.zoo import model_from_meta
    torch.manual_seed(0)
    q = prepare(_bn_stats(ResNet20()), QuantConfig(w_bits=8, a_bits=8), traced_adds=False)
    calibrate(q, [torch.randn(16, 3, 32, 32)])
    freeze(q.eval())
    monkeypatch.setattr(packing, "FORMAT_VERSION", 2)
    packing.save_packed(tmp_path / "v2.bsq", packing.convert(q, {"arch": "resnet20", "num_classes": 10}))
    monkeypatch.undo()
    back = packing.load_packed(tmp_path / "v2.bsq", model_from_meta)
    assert all(m.oq is None for m in quant_layers(back).values())
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back(x), q(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(packing.PackedFileError, match="format version 1; this bitsearch reads 2, 3"):
        monkeypatch.setattr(packing, "FORMAT_VERSION", 1)
        packing.save_packed(tmp_path / "v1.bsq", packing.convert(q, {"arch": "resnet20", "num_classes": 10}))
        monkeypatch.undo()
        packing.load_packed(tmp_path / "v1.bsq", model_from_meta)
