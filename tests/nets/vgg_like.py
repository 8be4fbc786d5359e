import torch
from torch import nn


class Net(nn.Module):
    """A small VGG-style network: convs with bias and no BN, a grouped conv, max-pooling, a Linear chain."""

    def __init__(self, num_classes):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32, 24), nn.ReLU(), nn.Dropout(0.1), nn.Linear(24, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def build(num_classes):
    return Net(num_classes)
