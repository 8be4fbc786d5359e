"""Integer residual adds in a traced model (one that does not describe its layers, quantization/trace.py).

An integer runtime adds two quantized tensors and writes a quantized sum (onnxruntime's QLinearAdd: both
inputs and the output on a grid, of one integer type). A model that describes itself says where its adds
are (trainer.model.LayerInfo.residual; api._quantize_outputs); for any other network this module finds them
in the torch.fx graph of the prepared model and puts quantizers where the runtime needs them:

* the sum, after the ReLU / ReLU6 that follows it (a Q with zero-point 0 absorbs it), is quantized once, by
  the input quantizer of the first quantized layer that reads it (``SharedInput``); the other quantized
  readers with the same kind of quantizer read that same quantizer's output, so branch and skip of the next
  block see one tensor. An add whose sum no quantized layer reads (before an FP32 classifier) stays FP32.
* each input of the add: the output of a quantized layer that only the add reads (its BN folded) gets the
  layer's output quantizer ``oq`` at the sum's bits; any other input is quantized where it is made, as the
  sum above is (a block input, already shared by the block's first layer); one that reaches the add through
  slicing, zero-padding or max-pooling of such a tensor (an option-A shortcut) is put back on that grid
  right before the add (``Requantize``: the values are already on it; ONNX needs the Q).

The prepared model then runs the rewritten graph: its class becomes a subclass of the model's own whose
``forward`` is the graph's code (fx traces and deep copies see it). A model whose traced graph differs
between training and evaluation (Python branches on ``self.training``) keeps its own forward and FP32 adds, as
does one whose graph fx cannot rewrite (a warning says why; the rewrite works on a copy).
"""
from __future__ import annotations

import copy
import operator
import warnings

import torch
from torch import fx, nn
from torch.nn import functional as F

from quantization.modules import FakeQuantizer, QuantConvBn2d, QuantLinear, Requantize, SharedInput, act_quantizer
from quantization import trace
from quantization.trace import PASS_MODULES

QUANT_LAYERS = (QuantConvBn2d, QuantLinear)
ADDS = (operator.add, operator.iadd, torch.add)  # iadd: torchvision's `out += identity`
ACT_MODULES = (nn.ReLU, nn.ReLU6)
ACT_FUNCTIONS = (F.relu, torch.relu, F.relu6)
GRID_FUNCTIONS = (operator.getitem, F.pad, F.max_pool2d)  # slices, zero pads and maxima keep values on a grid
GRID_MODULES = (nn.MaxPool2d,)


class _Tracer(trace._Tracer):
    """trace.py's tracer (Conv2d, Linear, BN leaves; PASS_MODULES there include the Identity a folded BN leaves),
    with quantized layers and shared quantizers as leaves too."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*QUANT_LAYERS, SharedInput)) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.Graph | None:
    """The model's graph, or None when training and evaluation trace differently."""
    was = model.training
    try:
        graphs = []
        for mode in (True, False):
            model.train(mode)
            graphs.append(_Tracer().trace(model))
    finally:
        model.train(was)
    same = graphs[0].python_code("self").src == graphs[1].python_code("self").src
    return graphs[1] if same else None


class _Rewrite:
    def __init__(self, model: nn.Module, graph: fx.Graph, cfg):
        self.model, self.graph, self.cfg = model, graph, cfg
        self.modules = dict(model.named_modules())
        self.n = 0

    def mod(self, node) -> nn.Module | None:
        return self.modules.get(node.target) if isinstance(node, fx.Node) and node.op == "call_module" else None

    def insert(self, after: fx.Node, module: nn.Module) -> fx.Node:
        name = f"bitsearch_q{self.n}"
        self.n += 1
        self.model.add_module(name, module)
        self.modules[name] = module
        with self.graph.inserting_after(after):
            return self.graph.call_module(name, (after,))

    def readers(self, node: fx.Node) -> list[fx.Node]:
        """The nodes that read ``node``'s values, looking through pass-through modules."""
        out = []
        for u in node.users:
            out += self.readers(u) if isinstance(self.mod(u), PASS_MODULES) else [u]
        return out

    def share(self, node: fx.Node) -> fx.Node | None:
        """``node``'s tensor quantized once, by its first quantized reader's input quantizer, for every reader
        (the node that does it; an existing one is reused). None when no quantized layer reads it."""
        if isinstance(self.mod(node), SharedInput):
            return node
        layers = [self.mod(r) for r in self.readers(node) if isinstance(self.mod(r), QUANT_LAYERS)]
        layers = [m for m in layers if m.aq is not None and not m.aq_outside]
        if not layers:
            return None
        first = layers[0]
        shared = self.insert(node, SharedInput(first))
        node.replace_all_uses_with(shared, delete_user_cb=lambda u: u is not shared and u.op != "output")
        for m in layers[1:]:  # the same kind of quantizer: read the shared one (one tensor, one set of codes)
            if _kind(m.aq) == _kind(first.aq):
                m.aq, m.aq_outside = first.aq, True
        return shared

    def quantize_input(self, node: fx.Node, add: fx.Node, bits: int) -> bool:
        """Put the add's input ``node`` on a grid; whether it could be."""
        chain, src = [node], node
        while _keeps_grid(src, self.mod(src)):
            src = src.args[0]
            chain.append(src)
        moved = any(not isinstance(self.mod(n), PASS_MODULES) for n in chain[:-1])
        layer = self.mod(src)
        if not moved and isinstance(layer, QUANT_LAYERS) and layer.oq is None and layer.aq is not None and \
                all(len(n.users) == 1 for n in chain):  # only the add reads this layer's output
            layer.oq = act_quantizer(bits, self.cfg, relu6=False)
            layer.oq.enabled = False  # until calibrated
            return True
        if self.share(node) is not None:  # a tensor quantized layers read too (a max-pooled stem output)
            return True
        shared = self.share(src) if src is not node else None
        if shared is None:
            return False
        if moved:  # sliced / padded / pooled on the way: back on the grid right before the add
            again = self.insert(node, Requantize(self.mod(shared).layer))
            add.replace_input_with(node, again)
        return True

    def run(self) -> bool:
        """Quantize every residual add whose sum a quantized layer reads; whether there was one."""
        adds = [n for n in self.graph.nodes if n.op == "call_function" and n.target in ADDS and len(n.args) == 2
                and not n.kwargs and all(isinstance(a, fx.Node) for a in n.args)]
        found = False
        for add in adds:
            out = add
            if len(add.users) == 1:
                (u,) = add.users
                if isinstance(self.mod(u), ACT_MODULES) or (u.op == "call_function" and u.target in ACT_FUNCTIONS
                                                             and not u.kwargs.get("inplace")):
                    out = u
            shared = self.share(out)
            if shared is None:
                continue  # no quantized layer reads the sum: the add stays FP32
            found = True
            bits = self.mod(shared).quantizer.bits
            for a in list(add.args):
                self.quantize_input(a, add, bits)
        return found


def _kind(q: FakeQuantizer) -> tuple:
    return q.bits, q.symmetric, q.qmin, q.qmax, q.lsq, q.max_clip, q.fused_relu6, type(q.observer)


def _keeps_grid(node: fx.Node, module: nn.Module | None) -> bool:
    if isinstance(module, (*GRID_MODULES, *PASS_MODULES)):
        return True
    if node.op != "call_function" or node.target not in GRID_FUNCTIONS:
        return False
    if node.target is F.pad:  # constant zero padding only (zero is on every grid bitsearch makes here)
        a = node.args
        return (node.kwargs.get("mode", a[2] if len(a) > 2 else "constant") == "constant"
                and not node.kwargs.get("value", a[3] if len(a) > 3 else None))
    return node.target is not operator.getitem or isinstance(node.args[1], (slice, tuple))


def quantize_traced_adds(model: nn.Module, cfg) -> nn.Module:
    """The prepared traced ``model`` rewritten so its residual adds run on quantized tensors (module
    docstring), as a new model; ``model`` itself when it has no such adds, or when its graph cannot be
    rewritten (a warning says why: the adds stay FP32, everything else is quantized as configured)."""
    work = copy.deepcopy(model)
    try:
        graph = _trace(work)
        if graph is None or not _Rewrite(work, graph, cfg).run():
            return model
        graph.lint()
        code = graph.python_code("self")
        ns = dict(code.globals)
        exec(compile(code.src, f"<bitsearch graph of {type(model).__name__}>", "exec"), ns)  # noqa: S102 - fx's code
    except Exception as e:  # noqa: BLE001 - whatever fx makes of an unusual forward: the model as it was
        warnings.warn(f"{type(model).__name__}: residual adds stay FP32 (its graph could not be rewritten: "
                      f"{type(e).__name__}: {str(e)[:200]})")
        return model
    cls = type(model)
    work.__class__ = type(cls.__name__, (cls,), {"forward": ns["forward"], "__module__": cls.__module__,
                                                 "__qualname__": cls.__qualname__})
    return work
