"""MobileNet-v2 for 32x32 inputs, built from a stage table.

Layer names (stable; quantization configs address them with glob patterns):

    stem.conv / stem.bn                 3x3 conv, 3 -> 32*w channels, stride 1 (CIFAR)
    blocks.{i}.expand.conv / .bn        1x1 expansion (absent when t == 1)
    blocks.{i}.dw.conv / .bn            3x3 depthwise conv
    blocks.{i}.project.conv / .bn       1x1 linear bottleneck (no activation)
    head.conv / head.bn                 1x1 conv to 1280 channels (kept 1280 when w < 1)
    classifier                          Linear(1280, num_classes), after dropout

Blocks are numbered 0..16 over the whole table. Every conv is followed by BN; ReLU6 after each
but the projection. At width 1.0 and 10 classes the model has 2,236,682 parameters.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

# (expansion t, output channels c, repeats n, stride s) of each stage: Sandler et al. 2018, Table 2,
# with the CIFAR change of stride 1 in the second stage (the stem is stride 1 as well).
STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),   # ImageNet: stride 2
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8, never below 90% of ``v`` (torchvision's rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class LayerInfo(NamedTuple):
    """One quantizable layer as the model describes it to the quantizer."""
    name: str                  # the conv / linear module (quantization configs address it: blocks.3.dw.conv)
    unit: str | None           # the conv -> BN -> act unit that runs as one op at inference (None: the layer alone)
    bn: str | None             # the BN right after it (folded into the conv), if any
    input_relu6: bool          # its input comes straight out of a ReLU6 (range [0, 6]: unsigned grid, clip <= 6)
    relu6_source: str | None   # that ReLU6 module when this layer is its only reader (the quantizer may absorb it)
    # integer runtimes also need these tensors quantized (quantization.api.prepare, QuantConfig.quantize_outputs):
    residual: str | None = None       # the residual block that adds this layer's output to its input (the
                                      # block's input_q reads that input once for the branch and the skip)
    pooled_relu6: str | None = None   # the ReLU6 after this layer when pooling reads its output


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, state dict and export), except that a strided depthwise conv under
    CPU bf16 autocast computes in FP32 and hands the autocast dtype on: PyTorch's CPU backward of a bf16
    depthwise conv with stride 2 is much slower than the FP32 one (measured: docs/RESULTS.md, training
    speed). Same values up to rounding; every other conv keeps bf16.
    QAT layers call this ``_conv_forward`` too."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (self.groups > 1 and self.groups == input.shape[1] and self.stride != (1, 1)
                and self.padding_mode == "zeros" and input.device.type == "cpu" and torch.is_autocast_enabled("cpu")):
            with torch.autocast("cpu", enabled=False):
                y = F.conv2d(input.float(), weight.float(), None if bias is None else bias.float(), self.stride,
                             self.padding, self.dilation, self.groups)
            return y.to(torch.get_autocast_dtype("cpu"))
        return super()._conv_forward(input, weight, bias)


class ConvBNAct(nn.Sequential):
    """conv -> BN -> ReLU6 (or no activation). Children named conv, bn, act."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU6(inplace=False) if act else nn.Identity()


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = cin * t
        self.use_res = stride == 1 and cin == cout
        if t != 1:
            self.expand = ConvBNAct(cin, hidden, 1)
        self.dw = ConvBNAct(hidden, hidden, 3, stride, groups=hidden)
        self.project = ConvBNAct(hidden, cout, 1, act=False)
        # a pass-through in the FP32 model; quantized, it reads the block's input once for both the branch and
        # the skip (LayerInfo.residual), as an integer runtime adds the two
        self.input_q = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_q(x)
        y = self.expand(x) if hasattr(self, "expand") else x
        y = self.project(self.dw(y))
        return x + y if self.use_res else y


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, dropout: float = 0.2):
        super().__init__()
        self.width, self.num_classes = width, num_classes
        cin = make_divisible(STEM_CHANNELS * width)
        self.stem = ConvBNAct(3, cin, 3, 1)
        blocks = []
        for t, c, n, s in STAGES:
            cout = make_divisible(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        head = make_divisible(HEAD_CHANNELS * max(1.0, width))
        self.head = ConvBNAct(cin, head, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def quantizable_layers(self) -> list[LayerInfo]:
        """The contract with quantization.prepare: every conv and linear it may quantize, in order, with
        what the quantizer needs to know about it (see LayerInfo)."""
        units = [("stem", self.stem, False, None)]
        for i, blk in enumerate(self.blocks):
            p = f"blocks.{i}"
            if hasattr(blk, "expand"):
                units.append((f"{p}.expand", blk.expand, False, None))
                dw_src = f"{p}.expand.act"
            else:  # t == 1 (block 0): dw reads the stem's ReLU6, unless the block adds that tensor back too
                dw_src = "stem.act" if i == 0 and not blk.use_res else None
            units.append((f"{p}.dw", blk.dw, True, dw_src))
            units.append((f"{p}.project", blk.project, True, f"{p}.dw.act"))
        units.append(("head", self.head, False, None))
        out = [LayerInfo(f"{n}.conv", n, f"{n}.bn", relu6, src) for n, _, relu6, src in units]
        for k, info in enumerate(out):
            blk = info.name.rpartition(".project.conv")[0]
            if blk and self.get_submodule(blk).use_res:
                out[k] = info._replace(residual=blk)
        out[-1] = out[-1]._replace(pooled_relu6="head.act")
        # the classifier reads the average of ReLU6 outputs (dropout only rescales in training)
        out.append(LayerInfo("classifier", None, None, True, None))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))                  # [B, 1280, 4, 4]
        x = torch.flatten(self.pool(x), 1)                        # [B, 1280]
        return self.classifier(self.dropout(x))                   # [B, classes]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_meta(model: MobileNetV2) -> dict:
    """What it takes to rebuild the architecture (stored in checkpoints)."""
    return {"arch": "mobilenet_v2_cifar", "width": model.width, "num_classes": model.num_classes,
            "dropout": model.dropout.p}


def model_from_meta(meta: dict) -> MobileNetV2:
    if meta.get("arch") != "mobilenet_v2_cifar":
        raise ValueError(f"unknown architecture {meta.get('arch')!r} (expected mobilenet_v2_cifar)")
    return MobileNetV2(num_classes=int(meta["num_classes"]), width=float(meta["width"]),
                       dropout=float(meta.get("dropout", 0.2)))
