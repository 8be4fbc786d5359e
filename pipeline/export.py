"""ONNX export of a packed model: a QDQ graph whose quantized layers ONNX Runtime runs as integer kernels.

The packed model is traced (torch.fx, quantized layers and torch.nn modules as leaves) and each node is
written as ONNX (opset 21), in the patterns ONNX Runtime's graph optimisation fuses (QLinearConv,
QLinearAdd, QGemm: DQ inputs -> op -> Q):

* quantized conv / linear: ``DequantizeLinear(int weight, scale, zero_point, axis=0)`` and, when the layer's
  input is quantized too, the bias as int32 codes at scale input scale x weight scale (the grid the
  fake-quant model uses, _QuantLayer.bias_scale) feeding the Conv / Gemm itself. Weight codes of <= 8 bits
  are stored as INT8 (``weights="int8"``), as UINT8 around zero-point 128 (``"uint8"``) or, with
  ``"int4"``, layers of <= 4 bits as INT4 / UINT4 (two codes per byte); the default ``"auto"`` picks int8 or
  uint8 for each layer on this CPU (int8 where onnxruntime's u8s8 kernels compute it exactly):
  pipeline/formats.py says what each costs. The codes are the packed file's: the export checks that they
  reproduce its weights. A float bias (input not quantized) stays its own Add.
* an activation quantizer (a layer's input ``aq``, its output ``oq``, a residual block's SharedInput, the
  SharedInput / Requantize that quantization/graph.py puts around a traced model's residual adds):
  ``QuantizeLinear -> DequantizeLinear`` (uint8 / int8 with the quantizer's scale and zero-point), with a
  Clip of the integer codes between them where the codes' range is narrower than the type: the a_bits
  range, and for a quantizer that absorbed a ReLU6 (fused_relu6) the codes of [0, 6] as
  fake_quantize_relu6 clamps them (the activation folded into Q's range). Clipping codes, not floats,
  keeps the patterns ONNX Runtime fuses: the op before the Q and the op after the DQ still become integer
  kernels at a_bits < 8.
* everything else as itself: Conv + BatchNormalization for FP32 exceptions (fused by ONNX Runtime),
  Relu, Clip(0, 6) for ReLU6, Sigmoid, x * Sigmoid(x) for SiLU, HardSwish, HardSigmoid, Add, Mul (a
  squeeze-excitation's scale), pooling, Flatten (also ``x.flatten(1)``), GlobalAveragePool (also
  ``x.mean((2, 3))``), Slice, Pad, Concat, Gemm; torchvision's stochastic depth outside training is the
  identity. Anything else is an ExportError naming it.

Input ``image``: float32 [N, 3, 32, 32] in [0, 1] (the CIFAR-10 normalisation is the graph's first two
nodes); output ``logits``: float32 [N, classes].
"""
from __future__ import annotations

import operator
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn
from torch.nn import functional as F

from quantization.api import bits_summary, quant_layers
from quantization.modules import RELU6_MAX, QuantConvBn2d, QuantLinear, SharedInput
from quantization.packing import load_packed
from pipeline.formats import WEIGHT_STORAGE, cpu_has_vnni, layer_storage, resolve_weights
from pipeline.quantize import load_baseline, packed_with_data
from quantization.primitives import dequantize, quantize
from trainer import evaluate, load_dataset, model_from_meta
from trainer.data import CIFAR10_MEAN, CIFAR10_STD

# onnxruntime is imported where a graph is run (compare_onnx): exporting needs only onnx, and every search
# trial exports.

OPSET = 21


class ExportError(RuntimeError):
    """The model holds something the ONNX export does not know how to write."""


def _int_type(bits: int, signed: bool, weights: str = "int4") -> str:
    """The integer type that holds ``bits``-bit codes: int8 / uint8, or int4 / uint4 for <= 4 bits when
    ``weights`` is "int4" (the smallest type ONNX Runtime dequantizes)."""
    return ("" if signed else "u") + ("int4" if bits <= 4 and weights == "int4" else "int8")


class _Graph:
    def __init__(self, weights: str = WEIGHT_STORAGE[0]):
        try:
            self.weights = resolve_weights(weights)
        except ValueError as e:
            raise ExportError(str(e)) from None
        self.nodes: list = []
        self.inits: list = []
        self.n = 0
        self.layers = {"int8": [], "uint8": [], "int4": [], "fp32": []}
        self.x_codes: dict[str, int] = {}  # a quantized activation's name -> its largest uint8 code

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, hint: str, value, dtype=np.float32) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def int_const(self, hint: str, codes: np.ndarray, bits: int, signed: bool, storage: str) -> str:
        """Integer codes as raw bytes of their ONNX type (INT4/UINT4: two per byte)."""
        np_type = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4, "int8": np.int8,
                   "uint8": np.uint8}[_int_type(bits, signed, storage)]
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(codes).astype(np.int64).astype(np_type), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _act_qdq(g: _Graph, x: str, q, hint: str) -> str:
    """The activation quantizer ``q`` (eval semantics of quantization.modules.FakeQuantizer)."""
    if q is None or not q.enabled:
        return x
    if q.axis is not None or q.scale.numel() != 1:
        raise ExportError(f"{hint}: per-channel activation quantizers are not exported")
    s, z = float(q.scale.reshape(())), int(q.zero_point.reshape(()))
    signed = q.qmin < 0
    lo, hi = int(q.qmin), int(q.qmax)
    if q.fused_relu6:  # fake_quantize_relu6's codes: [0, min(qmax, round(6 / s))] (zero-point 0)
        lo, hi = max(lo, z), min(hi, int(torch.round(RELU6_MAX / q.scale.detach().reshape(()).float())))
    dtype = np.int8 if signed else np.uint8
    zp = g.const(f"{hint}.zp", z, dtype)
    sc = g.const(f"{hint}.scale", s)
    qx = g.op("QuantizeLinear", [x, sc, zp], f"{hint}.q")
    info = np.iinfo(dtype)
    if (lo, hi) != (info.min, info.max):
        qx = g.op("Clip", [qx, g.const(f"{hint}.lo", lo, dtype), g.const(f"{hint}.hi", hi, dtype)], f"{hint}.range")
    dq = g.op("DequantizeLinear", [qx, sc, zp], f"{hint}.dq")
    if not signed:  # a signed input: layer_storage assumes any uint8 code (255) reaches the kernel
        g.x_codes[dq] = hi
    return dq


def _weight(g: _Graph, m, weight: torch.Tensor, hint: str, x: str, depthwise: bool = False) -> str:
    """The weight as an integer initializer + DequantizeLinear (quantized) or FP32 (not); ``x``: the name of
    the layer's input (its codes' range decides whether int8 storage computes exactly, layer_storage)."""
    wq = m.wq
    if wq is None:
        g.layers["fp32"].append(hint)
        return g.const(f"{hint}.weight", _np(weight))
    s, z = wq.scale, wq.zero_point
    codes = quantize(weight, s, z, wq.qmin, wq.qmax, wq.axis)
    if not torch.equal(dequantize(codes, s, z, wq.axis), weight.float()):
        raise ExportError(f"{hint}: the weight is not on its quantization grid (export a packed model: load_packed)")
    signed = wq.qmin < 0
    storage = layer_storage(g.weights, depthwise, max(-wq.qmin, wq.qmax), g.x_codes.get(x, 255))
    per_ch = wq.axis is not None
    zarr = _np(z).reshape(-1) if per_ch else np.asarray(int(z.reshape(())))
    if storage == "uint8" and signed:  # the same weights as unsigned codes around zero-point 128
        codes, zarr, signed = codes + 128, zarr + 128, False
    g.layers[_int_type(wq.bits, signed, storage).replace("uint4", "int4")].append(hint)
    w = g.int_const(f"{hint}.weight_q", _np(codes), wq.bits, signed, storage)
    sc = g.const(f"{hint}.weight_scale", _np(s).reshape(-1) if per_ch else float(s.reshape(())))
    zp = g.int_const(f"{hint}.weight_zp", zarr, wq.bits, signed, storage)
    return g.op("DequantizeLinear", [w, sc, zp], f"{hint}.weight_dq", **({"axis": 0} if per_ch else {}))


def _conv(g: _Graph, x: str, conv: nn.Conv2d, w: str, bias: torch.Tensor | None, hint: str,
          bias_scale: torch.Tensor | None = None) -> str:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ExportError(f"{hint}: only zero padding given as integers is exported")
    ph, pw = conv.padding
    ins, rest = _bias_input(g, [x, w], bias, bias_scale, hint)
    y = g.op("Conv", ins, hint, kernel_shape=list(conv.kernel_size), strides=list(conv.stride),
             pads=[ph, pw, ph, pw], dilations=list(conv.dilation), group=conv.groups)
    return _add_bias(g, y, rest, hint, (1, -1, 1, 1))


def _bias_input(g: _Graph, ins: list[str], bias: torch.Tensor | None, bias_scale: torch.Tensor | None,
                hint: str) -> tuple[list[str], torch.Tensor | None]:
    """The op's inputs with the bias as int32 codes + DequantizeLinear where the layer has a bias grid
    (what QLinearConv / QGemm add to their accumulator); else the inputs and the float bias left to add."""
    if bias is None or bias_scale is None:
        return ins, bias
    s = bias_scale.detach().float().reshape(-1).expand_as(bias.reshape(-1)).contiguous()
    codes = torch.round(bias.detach().float().reshape(-1) / s)  # QuantConvBn2d._bias_on_grid's rounding
    if codes.abs().max() >= 2 ** 31:
        raise ExportError(f"{hint}: the bias does not fit int32 at its grid")
    b = g.const(f"{hint}.bias_q", _np(codes).astype(np.int64), np.int32)
    dq = g.op("DequantizeLinear", [b, g.const(f"{hint}.bias_scale", _np(s)), g.const(f"{hint}.bias_zp", np.zeros(len(s)), np.int32)],
              f"{hint}.bias_dq", axis=0)
    return ins + [dq], None


def _add_bias(g: _Graph, y: str, bias: torch.Tensor | None, hint: str, shape: tuple) -> str:
    """A float bias as its own Add: given to a Conv / Gemm whose inputs are dequantized, ONNX Runtime
    would requantize it to int32 on the (activation scale x weight scale) grid, a different model
    (off by up to half a step per channel) than one whose input is not quantized."""
    if bias is None:
        return y
    return g.op("Add", [y, g.const(f"{hint}.bias", _np(bias).reshape(shape))], f"{hint}.bias_add")


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # nn.Conv2d subclasses too (trainer.model.Conv2d: same conv, its own kernel choice under autocast)
        return (isinstance(m, (QuantConvBn2d, QuantLinear, SharedInput, nn.Conv2d))
                or super().is_leaf_module(m, qualname))


def to_onnx(model: nn.Module, *, mean, std, input_size: int = 32, weights: str = WEIGHT_STORAGE[0]):
    """The ONNX ModelProto of ``model`` (eval semantics) and what it stored: {int8, int4, fp32: [layer names]}.
    ``weights``: how quantized weights are stored (WEIGHT_STORAGE, see the module's docstring)."""
    model = model.eval()
    g = _Graph(weights)
    graph = _Tracer().trace(model)
    mods = dict(model.named_modules())
    env: dict[str, str] = {}
    out_name = None
    for node in graph.nodes:
        a = [env[x.name] if isinstance(x, fx.Node) else x for x in node.args]
        if node.op == "placeholder":
            x = g.op("Sub", ["image", g.const("mean", np.asarray(mean, np.float32).reshape(1, 3, 1, 1))], "normalize")
            env[node.name] = g.op("Div", [x, g.const("std", np.asarray(std, np.float32).reshape(1, 3, 1, 1))], "normalize")
        elif node.op == "call_module":
            env[node.name] = _module_node(g, mods[node.target], node.target, a)
        elif node.op == "call_function":
            env[node.name] = _function_node(g, node, a)
        elif node.op == "call_method":
            env[node.name] = _method_node(g, node, a)
        elif node.op == "output":
            out_name = env[node.args[0].name]
        else:
            raise ExportError(f"{node.op} {node.target} has no ONNX export here")
    g.nodes.append(helper.make_node("Identity", [out_name], ["logits"], name="logits"))
    classes = getattr(model, "num_classes", "classes")
    gp = helper.make_graph(
        g.nodes, "bitsearch",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, input_size, input_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], g.inits)
    proto = helper.make_model(gp, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bitsearch")
    proto.ir_version = 10
    onnx.checker.check_model(proto, full_check=True)
    return proto, g.layers


def _module_node(g: _Graph, m: nn.Module, hint: str, a: list) -> str:
    """The ONNX nodes of one leaf module applied to the inputs ``a``; the name of its output."""
    if isinstance(m, QuantConvBn2d):
        if m.bn is not None:
            raise ExportError(f"{hint}: fold BN first (export a packed model: load_packed)")
        x = a[0] if m.aq_outside else _act_qdq(g, a[0], m.aq, f"{hint}.aq")
        c = m.conv
        depthwise = c.groups > 1 and c.groups == c.in_channels == c.out_channels
        y = _conv(g, x, c, _weight(g, m, c.weight, hint, x, depthwise), c.bias, hint, m.bias_scale())
        return _act_qdq(g, y, m.oq, f"{hint}.oq")
    if isinstance(m, QuantLinear):
        x = a[0] if m.aq_outside else _act_qdq(g, a[0], m.aq, f"{hint}.aq")
        ins, rest = _bias_input(g, [x, _weight(g, m, m.linear.weight, hint, x)], m.linear.bias, m.bias_scale(), hint)
        y = _add_bias(g, g.op("Gemm", ins, hint, transB=1), rest, hint, (1, -1))
        return _act_qdq(g, y, m.oq, f"{hint}.oq")
    if isinstance(m, SharedInput):
        return _act_qdq(g, a[0], m.quantizer, f"{hint}")
    if isinstance(m, nn.Conv2d):
        g.layers["fp32"].append(hint)
        return _conv(g, a[0], m, g.const(f"{hint}.weight", _np(m.weight)), m.bias, hint)
    if isinstance(m, nn.BatchNorm2d):
        ins = [a[0]] + [g.const(f"{hint}.{k}", _np(t)) for k, t in
                        (("weight", m.weight), ("bias", m.bias), ("mean", m.running_mean), ("var", m.running_var))]
        return g.op("BatchNormalization", ins, hint, epsilon=float(m.eps))
    if isinstance(m, nn.Linear):
        g.layers["fp32"].append(hint)
        ins = [a[0], g.const(f"{hint}.weight", _np(m.weight))] + (
            [g.const(f"{hint}.bias", _np(m.bias))] if m.bias is not None else [])
        return g.op("Gemm", ins, hint, transB=1)
    kind = next((k for t, k in MODULE_ACTIVATIONS.items() if isinstance(m, t)), None)
    if kind is not None:
        return _activation(g, kind, a[0], hint)
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return a[0]
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and m.output_size in (1, (1, 1)):
        return g.op("GlobalAveragePool" if isinstance(m, nn.AdaptiveAvgPool2d) else "GlobalMaxPool", [a[0]], hint)
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        return _pool(g, "MaxPool" if isinstance(m, nn.MaxPool2d) else "AveragePool", a[0], m.kernel_size, m.stride,
                     m.padding, m.ceil_mode, hint, getattr(m, "dilation", 1), getattr(m, "count_include_pad", True))
    if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
        return g.op("Flatten", [a[0]], hint, axis=1)
    raise ExportError(f"{hint}: {type(m).__name__} has no ONNX export here")


# elementwise activations (module types, functions) and their ONNX form; Hardsigmoid is relu6(x + 3) / 6
MODULE_ACTIVATIONS = {nn.ReLU6: "relu6", nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid",
                      nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid"}
FUNCTION_ACTIVATIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu", torch.sigmoid: "sigmoid",
                        F.sigmoid: "sigmoid", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid"}


def _activation(g: _Graph, kind: str, x: str, hint: str | None = None) -> str:
    if kind == "relu":
        return g.op("Relu", [x], hint)
    if kind == "relu6":
        return g.op("Clip", [x, g.const("zero", 0.0), g.const("six", 6.0)], hint)
    if kind == "sigmoid":
        return g.op("Sigmoid", [x], hint)
    if kind == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x])], hint)
    if kind == "hardswish":
        return g.op("HardSwish", [x], hint)
    return g.op("HardSigmoid", [x], hint, alpha=1.0 / 6.0, beta=0.5)


def _method_node(g: _Graph, node: fx.Node, a: list) -> str:
    """Tensor methods: ``x.flatten(1)``, ``x.mean((2, 3))`` (global average pooling, ``keepdim`` or not)."""
    if node.target == "flatten" and [*a[1:], *node.kwargs.values()] in ([1], [1, -1]) and \
            set(node.kwargs) <= {"start_dim", "end_dim"}:
        return g.op("Flatten", [a[0]], axis=1)
    dims = a[1] if len(a) > 1 else node.kwargs.get("dim")
    if node.target == "mean" and isinstance(dims, (tuple, list)) and sorted(int(d) % 4 for d in dims) == [2, 3]:
        y = g.op("GlobalAveragePool", [a[0]])
        return y if (a[2] if len(a) > 2 else node.kwargs.get("keepdim", False)) else g.op("Flatten", [y], axis=1)
    raise ExportError(f"method {node.target} has no ONNX export here")


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _pool(g: _Graph, op: str, x: str, kernel, stride, padding, ceil_mode: bool, hint: str, dilation=1,
          count_include_pad: bool = True) -> str:
    if _pair(dilation) != [1, 1]:
        raise ExportError(f"{hint}: pooling with dilation has no ONNX export here")
    k, p = _pair(kernel), _pair(padding)
    attrs = {"kernel_shape": k, "strides": _pair(stride if stride else kernel), "pads": p + p, "ceil_mode": int(ceil_mode)}
    if op == "AveragePool":
        attrs["count_include_pad"] = int(count_include_pad)
    return g.op(op, [x], hint, **attrs)


def _function_node(g: _Graph, node: fx.Node, a: list) -> str:
    if node.target in (operator.add, operator.iadd, torch.add) and len(a) == 2 and all(isinstance(v, str) for v in a):
        return g.op("Add", a)
    if node.target is torch.flatten and a[1:] in ([1], [1, -1]) and not node.kwargs:
        return g.op("Flatten", [a[0]], axis=1)
    if node.target in FUNCTION_ACTIVATIONS and not node.kwargs.get("inplace"):
        return _activation(g, FUNCTION_ACTIVATIONS[node.target], a[0])
    if node.target in (operator.mul, torch.mul) and len(a) == 2 and any(isinstance(v, str) for v in a):
        return g.op("Mul", [v if isinstance(v, str) else g.const("factor", float(v)) for v in a])
    if getattr(node.target, "__name__", "") == "stochastic_depth":  # torchvision.ops: (input, p, mode, training)
        p = a[1] if len(a) > 1 else node.kwargs.get("p")
        training = a[3] if len(a) > 3 else node.kwargs.get("training", True)
        if not training or p == 0:
            return a[0]  # outside training: the input as it is
    if node.target is operator.getitem and isinstance(a[1], tuple) and all(isinstance(v, slice) for v in a[1]):
        return _slice(g, a[0], a[1])
    if node.target is F.pad and isinstance(a[1], (tuple, list)) and node.kwargs.get("mode", "constant") == "constant":
        return _pad(g, a[0], list(a[1]), float(node.kwargs.get("value") or 0.0))
    if node.target is torch.cat and isinstance(a[0], (list, tuple)):
        return g.op("Concat", list(a[0]), axis=int(node.kwargs.get("dim", a[1] if len(a) > 1 else 0)))
    if node.target in (F.max_pool2d, F.avg_pool2d) and len(a) >= 2:
        kw = node.kwargs
        return _pool(g, "MaxPool" if node.target is F.max_pool2d else "AveragePool", a[0], a[1],
                     kw.get("stride", a[2] if len(a) > 2 else None), kw.get("padding", a[3] if len(a) > 3 else 0),
                     bool(kw.get("ceil_mode", False)), "pool")
    if node.target is F.adaptive_avg_pool2d and a[1:] in ([1], [(1, 1)]):
        return g.op("GlobalAveragePool", [a[0]])
    raise ExportError(f"{node.target} has no ONNX export here")


def _slice(g: _Graph, x: str, index: tuple) -> str:
    """``x[s0, s1, ...]`` with slices only: ONNX Slice over the axes that are not ``:``."""
    axes, starts, ends, steps = [], [], [], []
    for axis, s in enumerate(index):
        if s == slice(None):
            continue
        axes.append(axis)
        starts.append(0 if s.start is None else int(s.start))
        ends.append(np.iinfo(np.int64).max if s.stop is None else int(s.stop))
        steps.append(1 if s.step is None else int(s.step))
    if not axes:
        return x
    return g.op("Slice", [x] + [g.const(k, v, np.int64) for k, v in
                                (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps))])


def _pad(g: _Graph, x: str, pad: list[int], value: float, rank: int = 4) -> str:
    """F.pad's (last dim first, begin/end pairs) as ONNX Pad's pads (every axis' begins, then every end)."""
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = int(pad[2 * i]), int(pad[2 * i + 1])
    return g.op("Pad", [x, g.const("pads", begins + ends, np.int64), g.const("pad_value", value)], mode="constant")


def _save(proto, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        onnx.save(proto, tmp)
        tmp.replace(out)
    finally:  # a failed save (disk full, ...) leaves nothing behind
        tmp.unlink(missing_ok=True)
    return out


def export_packed(packed: str | Path, out: str | Path, weights: str = WEIGHT_STORAGE[0], latency: bool = True) -> dict[str, Any]:
    """Write the ONNX QDQ model of a packed .bsq file to ``out``; the JSON summary (DESIGN.md keys), with the
    measured latency of what was written (``latency_summary``) unless ``latency`` is False."""
    model = load_packed(packed, model_from_meta)
    proto, layers = to_onnx(model, mean=CIFAR10_MEAN, std=CIFAR10_STD, weights=weights)
    out = _save(proto, out)
    res = {"out": str(out), "onnx_bytes": out.stat().st_size, "opset": OPSET, "weights": resolve_weights(weights),
           **{f"layers_{k}": len(v) for k, v in layers.items()},
           "packed": str(packed), "packed_bytes": Path(packed).stat().st_size,
           **bits_summary(quant_layers(model).values()), "layers": layers}
    return {**res, **(latency_summary(out) if latency else {})}


def export_checkpoint(checkpoint: str | Path, out: str | Path, latency: bool = True) -> dict[str, Any]:
    """`bitsearch export --checkpoint`: the FP32 ONNX graph of a baseline, the reference for speed and
    accuracy."""
    model, _ = load_baseline(checkpoint)
    proto, layers = to_onnx(model, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    out = _save(proto, out)
    res = {"out": str(out), "onnx_bytes": out.stat().st_size, "opset": OPSET, "checkpoint": str(checkpoint),
           "bits": "W32A32", "w_bits": 32, "a_bits": 32, "layers_fp32": len(layers["fp32"])}
    return {**res, **(latency_summary(out) if latency else {})}


def _session(path: str | Path, threads: int = 0, optimized_to: str | Path | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_to is not None:
        so.optimized_model_filepath = str(optimized_to)
        so.log_severity_level = 3  # not the warning that a file optimised for this CPU is for this CPU
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency_ms(path: str | Path, batch: int = 1, threads: int = 1, seconds: float = 0.3, input_size: int = 32) -> float:
    """Median wall time (ms) of one onnxruntime run of the model at ``path`` on a random batch."""
    return _median_ms(_session(path, threads), batch, seconds, input_size)


def _median_ms(sess, batch: int, seconds: float, input_size: int = 32) -> float:
    x = np.random.default_rng(0).random((batch, 3, input_size, input_size), dtype=np.float32)
    sess.run(["logits"], {"image": x})  # warm-up: the first run allocates
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 1000):
        t0 = time.perf_counter()
        sess.run(["logits"], {"image": x})
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def _op_counts(optimized: Path) -> dict[str, int]:
    return dict(Counter(n.op_type for n in onnx.load(str(optimized)).graph.node))


def optimized_ops(path: str | Path) -> dict[str, int]:
    """The op types (and how many of each) that onnxruntime runs for the model at ``path`` after its graph
    optimisation: whether the quantized layers became integer kernels (QLinearConv, QLinearAdd, ...)."""
    with tempfile.TemporaryDirectory() as d:
        _session(path, 1, Path(d) / "optimized.onnx")
        return _op_counts(Path(d) / "optimized.onnx")


INTEGER_CONVS = ("QLinearConv", "ConvInteger")


def latency_summary(path: str | Path, seconds: float = 0.2) -> dict[str, Any]:
    """What an export JSON says of the speed of what it wrote: the median latency at batch 1 on 1 thread
    and how many convolutions onnxruntime runs as integer kernels (one session serves both)."""
    with tempfile.TemporaryDirectory() as d:
        sess = _session(path, 1, Path(d) / "optimized.onnx")
        ops = _op_counts(Path(d) / "optimized.onnx")
    convs = sum(ops.get(k, 0) for k in ("Conv", "FusedConv", "NchwcConv", *INTEGER_CONVS))
    return {"latency_ms_b1": round(_median_ms(sess, 1, seconds), 3), "convs": convs,
            "integer_convs": sum(ops.get(k, 0) for k in INTEGER_CONVS), "ops": ops, "cpu_vnni": cpu_has_vnni()}


def run_onnx(path: str | Path, images: torch.Tensor, batch_size: int = 256, threads: int = 0) -> torch.Tensor:
    """Logits of the ONNX model at ``path`` (onnxruntime, CPU) for uint8 or [0, 1] images [N, 3, H, W]."""
    sess = _session(path, threads)
    outs = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
        outs.append(torch.from_numpy(sess.run(["logits"], {"image": x.numpy()})[0]))
    return torch.cat(outs) if outs else torch.zeros(0)


def compare_onnx(model: nn.Module, data, onnx_path: str | Path) -> dict[str, Any]:
    """Run the ONNX model (onnxruntime, CPU) and ``model`` (the packed model in PyTorch) on ``data``'s
    test images: both top-1s (%) and the share of images on which their predictions agree (%)."""
    ref = evaluate(model, data.test_x, data.test_y, device=torch.device("cpu"))
    pred = run_onnx(onnx_path, data.test_x).argmax(1)
    n = max(1, len(data.test_y))
    return {"onnx_top1": 100.0 * (pred == data.test_y).sum().item() / n, "packed_top1": ref["top1"],
            "agreement": 100.0 * (pred == ref["pred"]).sum().item() / n, "test_images": len(data.test_y)}


def export_model(packed: str | Path | None, out: str | Path, check_data: str | None = None, download: bool = True,
                 log=lambda s: None, weights: str = WEIGHT_STORAGE[0], checkpoint: str | Path | None = None) -> dict[str, Any]:
    """`bitsearch export`: the ONNX graph of a packed file (or, with ``checkpoint``, of an FP32 baseline);
    with ``check_data`` (a data path) also run in onnxruntime against the model in PyTorch on its test images
    (the data is read first: a bad path fails before anything is written)."""
    if weights not in WEIGHT_STORAGE:
        raise ExportError(f"--weights {weights} is invalid: allowed {', '.join(WEIGHT_STORAGE)}")
    if checkpoint is not None:
        checked = None
        if check_data:
            model, ck = load_baseline(checkpoint)
            checked = (model, load_dataset(check_data, download=download, progress=log))
        result = export_checkpoint(checkpoint, out)
    else:
        checked = packed_with_data(packed, check_data, download, log) if check_data else None
        result = export_packed(packed, out, weights)  # PackedFileError for a bad .bsq: one line
    if checked:
        result.update(compare_onnx(*checked, out))
    return result
