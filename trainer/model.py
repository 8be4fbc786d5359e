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

from typing import Callable

import torch
from torch import nn

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


class ConvBNAct(nn.Sequential):
    """conv -> BN -> ReLU6 (or no activation). Children named conv, bn, act."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True,
                 conv_layer: Callable[..., nn.Module] = nn.Conv2d):
        super().__init__()
        self.conv = conv_layer(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU6(inplace=False) if act else nn.Identity()


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int, conv_layer=nn.Conv2d):
        super().__init__()
        hidden = cin * t
        self.use_res = stride == 1 and cin == cout
        if t != 1:
            self.expand = ConvBNAct(cin, hidden, 1, conv_layer=conv_layer)
        self.dw = ConvBNAct(hidden, hidden, 3, stride, groups=hidden, conv_layer=conv_layer)
        self.project = ConvBNAct(hidden, cout, 1, act=False, conv_layer=conv_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if hasattr(self, "expand") else x
        y = self.project(self.dw(y))
        return x + y if self.use_res else y


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, dropout: float = 0.2,
                 conv_layer: Callable[..., nn.Module] = nn.Conv2d,
                 linear_layer: Callable[..., nn.Module] = nn.Linear):
        super().__init__()
        self.width, self.num_classes = width, num_classes
        cin = make_divisible(STEM_CHANNELS * width)
        self.stem = ConvBNAct(3, cin, 3, 1, conv_layer=conv_layer)
        blocks = []
        for t, c, n, s in STAGES:
            cout = make_divisible(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, conv_layer))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        head = make_divisible(HEAD_CHANNELS * max(1.0, width))
        self.head = ConvBNAct(cin, head, 1, conv_layer=conv_layer)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = linear_layer(head, num_classes)
        self._init_weights()
        self._mark_relu6_inputs()

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

    def _mark_relu6_inputs(self) -> None:
        """Tag convs/linears whose input comes straight out of a ReLU6 (range [0, 6]); activation
        quantizers use it: unsigned grid, zero-point 0, clip at most 6. ``relu6_source`` names the
        ReLU6 module when this conv is its only reader."""
        for m in self.modules():
            if isinstance(m, ConvBNAct):
                m.conv.input_relu6, m.conv.relu6_source = False, None
        for i, blk in enumerate(self.blocks):
            # dw reads the expansion's ReLU6 (or, with t == 1, the previous ReLU6 unit: the stem)
            blk.dw.conv.input_relu6 = hasattr(blk, "expand") or blk is self.blocks[0]
            blk.project.conv.input_relu6 = True
            # the ReLU6 module whose output only this conv reads (quantization may fuse the two)
            blk.dw.conv.relu6_source = (f"blocks.{i}.expand.act" if hasattr(blk, "expand") else
                                        "stem.act" if i == 0 and not blk.use_res else None)  # else x is read twice
            blk.project.conv.relu6_source = f"blocks.{i}.dw.act"
        self.classifier.input_relu6 = True  # average of ReLU6 outputs, dropout only rescales in training

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
