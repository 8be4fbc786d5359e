"""Peak activation memory of one inference, measured by tensor liveness over the traced graph.

Method
------
1. Trace the model with torch.fx, treating each conv unit (conv + BN + activation, fused at
   inference), linear, pooling and dropout as one node; run it once (ShapeProp) to get every
   intermediate tensor's shape. Element counts scale exactly with the batch size.
2. Storage precision of each tensor: a tensor can be kept at ``b`` bits when everything that reads
   it reads it at most at ``b`` bits. A quantized layer reads its input at its ``a_bits``; an FP32
   layer and the model output read at 32; element-wise / pooling / reshaping nodes pass on what
   their own output needs (computed backwards through the graph). The input image is read by the
   first conv, FP32 by default, so it stays at 32 bits.
3. Liveness: a tensor lives from the node that makes it to its last reader. Walking the nodes in
   execution order, the memory in use at a step is the sum of the live tensors' bytes
   (ceil(elements * bits / 8)); the peak is the maximum over steps. Weights are not counted.

The ratio FP32 peak / quantized peak is therefore not simply 32 / a_bits: FP32 tensors that stay
live (the input image, the input of an FP32 classifier, residual branches read at higher
precision) count in full.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from quantization.modules import QuantConvBn2d, QuantLinear

_PASS_THROUGH = {"add", "iadd", "flatten", "relu6", "dropout", "adaptive_avg_pool2d", "reshape", "view", "cat",
                 "mul", "getattr"}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.Sequential) and hasattr(m, "conv") and hasattr(m, "bn"):
            return True  # a conv unit (ConvBNAct): one fused op at inference
        return isinstance(m, (QuantConvBn2d, QuantLinear)) or super().is_leaf_module(m, qualname)


def _input_bits(module: nn.Module) -> int:
    """Bits at which ``module`` reads its input (32 unless it quantizes it)."""
    if isinstance(module, (QuantConvBn2d, QuantLinear)):
        return module.aq.bits if module.aq is not None and module.aq.enabled else 32
    conv = getattr(module, "conv", None)
    if isinstance(conv, (QuantConvBn2d, QuantLinear)):
        return _input_bits(conv)
    return 32


def _is_compute(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear, QuantConvBn2d, QuantLinear)) or hasattr(module, "conv")


@torch.no_grad()
def activation_memory(model: nn.Module, input_shape=(1, 3, 32, 32), batch_sizes=(1, 128)) -> dict[str, Any]:
    """Peak live activation bytes of one forward pass at FP32 and as the model stores them."""
    was = model.training
    model.eval()
    gm = fx.GraphModule(model, _Tracer().trace(model))
    ShapeProp(gm).propagate(torch.zeros(input_shape, device=next(model.parameters()).device))
    model.train(was)
    nodes = [n for n in gm.graph.nodes]
    modules = dict(gm.named_modules())
    numel = {}
    for n in nodes:
        tm = n.meta.get("tensor_meta")
        numel[n] = math.prod(tm.shape) // input_shape[0] if tm is not None and hasattr(tm, "shape") else 0

    # storage bits, backwards: a tensor's bits = max over its readers of the bits they read it at
    bits: dict[fx.Node, int] = {}
    for n in reversed(nodes):
        reads = []
        for u in n.users:
            if u.op == "output":
                reads.append(32)
            elif u.op == "call_module" and _is_compute(modules[u.target]):
                reads.append(_input_bits(modules[u.target]))
            else:
                reads.append(bits.get(u, 32))  # pass-through: what its own output needs
        bits[n] = max(reads) if reads else 32

    order = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max([order[u] for u in n.users], default=order[n]) for n in nodes}

    def peak(batch: int, quantized: bool) -> int:
        best = 0
        for t, _ in enumerate(nodes):
            live = 0
            for n in nodes:
                if numel[n] and order[n] <= t <= last_use[n] and n.op != "output":
                    b = bits[n] if quantized else 32
                    live += math.ceil(numel[n] * batch * b / 8)
            best = max(best, live)
        return best

    out: dict[str, Any] = {"method": "fx liveness over fused conv units; see quantization/actmem.py"}
    for b in batch_sizes:
        f, q = peak(b, False), peak(b, True)
        out[f"batch{b}"] = {"fp32_bytes": f, "quant_bytes": q, "ratio": f / q}
    out["act_ratio"] = out[f"batch{batch_sizes[0]}"]["ratio"]
    return out
