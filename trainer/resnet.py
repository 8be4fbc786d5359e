"""ResNet-20 for 32x32 inputs: He et al. 2016 ("Deep Residual Learning for Image Recognition"), section 4.2.

A 3x3 conv to 16 channels, three stages of three basic blocks (16, 32, 64 channels; the first block of
stages 2 and 3 halves the resolution), global average pooling and a linear classifier: 20 weighted layers,
269,722 parameters at 10 classes. The shortcut is the paper's option A: identity, and where the shape
changes the input subsampled by 2 and zero-padded to the new channel count (no parameters).

Layer names: ``stem.conv`` / ``stem.bn``, ``layers.{i}.conv1`` / ``bn1`` / ``conv2`` / ``bn2`` (blocks 0..8
over the three stages), ``classifier``. The model does not describe its quantizable layers: the
quantizer finds them by tracing (quantization/trace.py), as for any network a user brings.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

WIDTHS = (16, 32, 64)
BLOCKS_PER_STAGE = 3


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if self.stride != 1 or self.pad:  # option A: subsample, zero-pad the new channels
            x = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return self.relu2(y + x)


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False))
        self.stem.add_module("bn", nn.BatchNorm2d(WIDTHS[0]))
        self.stem.add_module("act", nn.ReLU())
        blocks, cin = [], WIDTHS[0]
        for s, cout in enumerate(WIDTHS):
            for i in range(BLOCKS_PER_STAGE):
                blocks.append(BasicBlock(cin, cout, 2 if s > 0 and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))
