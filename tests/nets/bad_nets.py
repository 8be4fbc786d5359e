"""Networks bitsearch must refuse with one clear line (tests/test_any_cnn.py)."""
import torch
from torch import nn


class Branchy(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.mean((2, 3)))


class WithLayerNorm(nn.Module):  # weights of a kind bitsearch neither quantizes nor folds
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).mean((2, 3)))


def branchy(num_classes):
    return Branchy(num_classes)


def group_norm(num_classes):
    return WithLayerNorm(num_classes)


def not_a_module(num_classes):
    return [num_classes]
