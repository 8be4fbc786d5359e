"""Peak activation memory of one inference, measured by tensor liveness over the traced graph.

Method
------
1. Trace the model with torch.fx, treating each conv unit the model describes (conv + BN +
   activation, fused at inference), linear, pooling and dropout as one node; run it once (ShapeProp) to get every
   intermediate tensor's shape. Element counts scale exactly with the batch size.
2. Storage precision of each tensor, as the model computes it: a tensor is stored at ``b`` bits only
   when its one and only reader is a quantized layer whose input quantizer reads it at ``b`` bits
   (the producer can then write its output straight onto that grid, as integer runtimes do).
   Views (flatten, reshape, dropout and identity at inference) pass their reader on. A tensor a
   quantizer writes (a layer's output quantizer, a residual block's SharedInput: QuantConfig.quantize_outputs)
   is stored at that quantizer's bits whoever reads it. Any other tensor read by something else (a residual
   ``add``, pooling, an FP32 layer, the model output) needs the full-precision values and counts at 32 bits. tests/test_quant_packing.py checks that every tensor
   counted below 32 bits really holds at most 2^b distinct values.
3. Liveness: a tensor lives from the node that makes it to its last reader (a view extends the life
   of the tensor it aliases and adds no bytes of its own). Walking the nodes in execution order, the
   memory in use at a step is the sum of the live tensors' bytes (ceil(elements * bits / 8)); the
   peak is the maximum over steps. Weights are not counted.

The ratio FP32 peak / quantized peak is therefore not simply 32 / a_bits: FP32 tensors that stay
live (the input image, residual branches, the input of an FP32 classifier) count in full.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from quantization.api import described_layers
from quantization.modules import QuantConvBn2d, QuantLinear, SharedInput

VIEW_FUNCTIONS = (torch.flatten, torch.reshape)
VIEW_METHODS = ("view", "reshape", "flatten", "contiguous")
VIEW_MODULES = (nn.Dropout, nn.Identity, nn.Flatten)


class _Tracer(fx.Tracer):
    """Conv units the model describes (conv -> BN -> act, one fused op at inference) and quantized
    layers are single nodes."""

    def __init__(self, units: set[str]):
        super().__init__()
        self.units = units

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname in self.units or isinstance(m, (QuantConvBn2d, QuantLinear, SharedInput))
                or super().is_leaf_module(m, qualname))


def _layer_in(module: nn.Module):
    if isinstance(module, (QuantConvBn2d, QuantLinear)):
        return module
    return next((c for c in module.children() if isinstance(c, (QuantConvBn2d, QuantLinear))), None)


def _on(q):
    return q if q is not None and q.enabled else None


def input_quantizer(module: nn.Module):
    """The activation quantizer through which ``module`` (a quantized layer, a unit holding one, or a
    block's SharedInput) reads its input (None: it reads FP32)."""
    if isinstance(module, SharedInput):
        return _on(module.quantizer)
    layer = _layer_in(module)
    return _on(layer.aq) if layer is not None else None


def output_quantizer(module: nn.Module):
    """The quantizer that puts ``module``'s own output on a grid (a layer's ``oq``, a SharedInput), or None."""
    if isinstance(module, SharedInput):
        return _on(module.quantizer)
    layer = _layer_in(module)
    return _on(layer.oq) if layer is not None else None


def is_view(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A node whose output holds its input's values (no new tensor at inference)."""
    return ((node.op == "call_function" and node.target in VIEW_FUNCTIONS)
            or (node.op == "call_method" and node.target in VIEW_METHODS)
            or (node.op == "call_module" and isinstance(modules[node.target], VIEW_MODULES)))


@dataclass
class Tensor:
    node: fx.Node
    numel: int          # elements per image (0 for a view: it aliases its input)
    bits: int           # storage precision as the model computes it


@torch.no_grad()
def tensor_table(model: nn.Module, input_shape=(1, 3, 32, 32)) -> tuple[fx.GraphModule, list[Tensor]]:
    """The traced graph and, per node in execution order, its size and storage precision."""
    was = model.training
    model.eval()
    units = {i.unit for i in described_layers(model) if i.unit}
    gm = fx.GraphModule(model, _Tracer(units).trace(model))
    ShapeProp(gm).propagate(torch.zeros(input_shape, device=next(model.parameters()).device))
    model.train(was)
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)

    def readers(n: fx.Node) -> list[fx.Node]:
        """The nodes that consume ``n``'s values, looking through views."""
        out = []
        for u in n.users:
            out += readers(u) if is_view(u, modules) else [u]
        return out

    table = []
    for n in nodes:
        tm = n.meta.get("tensor_meta")
        numel = math.prod(tm.shape) // input_shape[0] if tm is not None and hasattr(tm, "shape") else 0
        if is_view(n, modules) or n.op == "output":
            numel = 0
        rs = readers(n)
        q = output_quantizer(modules[n.target]) if n.op == "call_module" else None
        if q is None and len(rs) == 1 and rs[0].op == "call_module":
            q = input_quantizer(modules[rs[0].target])
        table.append(Tensor(n, numel, q.bits if q is not None else 32))
    return gm, table


@torch.no_grad()
def activation_memory(model: nn.Module, input_shape=(1, 3, 32, 32), batch_sizes=(1, 128)) -> dict[str, Any]:
    """Peak live activation bytes of one forward pass at FP32 and as the model stores them."""
    gm, table = tensor_table(model, input_shape)
    modules = dict(gm.named_modules())
    order = {t.node: i for i, t in enumerate(table)}
    last_use = {t.node: max([order[u] for u in t.node.users], default=order[t.node]) for t in table}
    for t in reversed(table):  # a view keeps the tensor it aliases alive as long as itself
        if is_view(t.node, modules):
            for src in t.node.all_input_nodes:
                last_use[src] = max(last_use[src], last_use[t.node])

    def peak(batch: int, quantized: bool) -> int:
        best = 0
        for step in range(len(table)):
            live = sum(math.ceil(t.numel * batch * (t.bits if quantized else 32) / 8) for t in table
                       if t.numel and order[t.node] <= step <= last_use[t.node])
            best = max(best, live)
        return best

    out: dict[str, Any] = {"method": "fx liveness over fused conv units; see quantization/actmem.py"}
    for b in batch_sizes:
        f, q = peak(b, False), peak(b, True)
        out[f"batch{b}"] = {"fp32_bytes": f, "quant_bytes": q, "ratio": f / q}
    out["act_ratio"] = out[f"batch{batch_sizes[0]}"]["ratio"]
    return out
