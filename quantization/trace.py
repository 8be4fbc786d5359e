"""Layer facts of any CNN, found by tracing it (torch.fx), for a model that does not describe its own
quantizable layers (``quantizable_layers()``, as trainer.model.MobileNetV2 does).

For every Conv2d and Linear the graph calls, in execution order: the BatchNorm2d that reads only its output
(folded into it), whether its input is non-negative (it comes from ReLU or ReLU6, through pooling, flatten,
dropout or identity: an unsigned activation grid; from ReLU6 also bounded by 6), and the ReLU6 module whose
output only it reads (the quantizer may apply that ReLU6 itself). Residual adds are not found here: the
prepared model's graph is rewritten for them (quantization/graph.py); pooled outputs stay FP32.
"""
from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch import fx, nn
from torch.nn import functional as F

from quantization.config import QuantConfigError

QUANTIZABLE = (nn.Conv2d, nn.Linear)
# modules with parameters or buffers that the quantizer understands (folded BN) or that carry no weights
KNOWN_WEIGHTED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
# ops that keep a non-negative tensor non-negative (and a ReLU6 output within [0, 6])
KEEP_SIGN_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout,
                     nn.Identity)
KEEP_SIGN_FUNCTIONS = (torch.flatten, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                       F.dropout, torch.mean, operator.getitem)
KEEP_SIGN_METHODS = ("view", "reshape", "flatten", "mean", "contiguous", "squeeze", "unsqueeze")
RELU_FUNCTIONS = (F.relu, torch.relu, F.relu_)
RELU6_FUNCTIONS = (F.relu6,)
# pass-throughs between a ReLU6 and the layer that reads it (the quantizer may absorb that ReLU6)
PASS_MODULES = (nn.Identity, nn.Dropout)


class TracedLayer(NamedTuple):
    """One quantizable layer as tracing finds it (the fields of trainer.model.LayerInfo, plus input_nonneg)."""
    name: str
    unit: str | None
    bn: str | None
    input_relu6: bool
    relu6_source: str | None
    residual: str | None = None
    pooled_relu6: str | None = None
    input_nonneg: bool = False


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every Conv2d, Linear and BatchNorm2d a leaf, subclasses included (a model's own
    Conv2d subclass may branch on its input in forward)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, KNOWN_WEIGHTED) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` traced by torch.fx; QuantConfigError (one line, naming the model) when it cannot be."""
    try:
        return fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:  # noqa: BLE001 - fx raises many kinds (TraceError, TypeError on data-dependent flow)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantConfigError(f"{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: {msg[:200]}): "
                               "bitsearch quantizes models whose forward has no data-dependent Python control flow, "
                               "or that describe their layers (quantizable_layers())") from None


def _sign(node, modules: dict[str, nn.Module], seen: int = 0) -> tuple[bool, bool]:
    """(non-negative, within [0, 6]) of the tensor a node produces."""
    if seen > 64 or not isinstance(node, fx.Node):
        return False, False
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and m.min_val == 0 and m.max_val <= 6):
            return True, True
        if isinstance(m, nn.ReLU):
            return True, False
        if isinstance(m, KEEP_SIGN_MODULES):
            return _sign(node.args[0], modules, seen + 1)
    elif node.op == "call_function":
        if node.target in RELU6_FUNCTIONS:
            return True, True
        if node.target in RELU_FUNCTIONS:
            return True, False
        if node.target in KEEP_SIGN_FUNCTIONS:
            return _sign(node.args[0], modules, seen + 1)
    elif node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return True, False
        if node.target in KEEP_SIGN_METHODS:
            return _sign(node.args[0], modules, seen + 1)
    return False, False


def _relu6_source(node, layer: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The ReLU6 module whose output reaches only ``layer`` (through pass-throughs), called once in the graph."""
    while isinstance(node, fx.Node) and node.op == "call_module" and isinstance(modules[node.target], PASS_MODULES):
        if len(node.users) != 1:
            return None
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "call_module" and isinstance(modules[node.target], nn.ReLU6)):
        return None
    chain, n = node, node
    while len(n.users) == 1:
        (n,) = n.users
        if n is layer:
            return chain.target
        if not (n.op == "call_module" and isinstance(modules[n.target], PASS_MODULES)):
            return None
    return None


def traced_layers(model: nn.Module) -> list[TracedLayer]:
    """Every Conv2d and Linear of ``model`` in the order its forward calls them, with their facts.
    QuantConfigError naming the module for what the quantizer cannot handle: a weighted module of another
    kind, a layer called twice (shared weights), a model that cannot be traced."""
    gm = trace(model)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False)) + [b for b in m.buffers(recurse=False)]
        if own and not isinstance(m, KNOWN_WEIGHTED):
            raise QuantConfigError(f"module {name} ({type(m).__name__}) has weights bitsearch cannot quantize or fold: "
                                   "supported are Conv2d, Linear and BatchNorm2d")
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], QUANTIZABLE):
            continue
        if calls[node.target] > 1:
            raise QuantConfigError(f"module {node.target} is called {calls[node.target]} times in forward (shared "
                                   "weights): bitsearch quantizes a layer that runs once")
        bn = None
        if isinstance(modules[node.target], nn.Conv2d) and len(node.users) == 1:
            (user,) = node.users
            if user.op == "call_module" and isinstance(modules[user.target], nn.BatchNorm2d) and calls[user.target] == 1:
                bn = user.target
        nonneg, relu6 = _sign(node.args[0], modules)
        out.append(TracedLayer(node.target, None, bn, relu6, _relu6_source(node.args[0], node, modules) if relu6 else None,
                               input_nonneg=nonneg))
    if not out:
        raise QuantConfigError(f"{type(model).__name__} calls no Conv2d or Linear layer: nothing to quantize")
    return out
