"""Demo CNNs for the default data set (Fashion-MNIST, 28x28x1, trained on 2 CPU cores)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import conv3x3, init_conv_bn
from .registry import register_model


class PlainCNN(nn.Module):
    """A VGG-style stack of 3x3 conv-BN-ReLU layers and 2x2 max pools, then global average pooling and a linear head.

    ``cfg`` lists conv widths, with ``"M"`` for a max pool. Small and fast on a CPU: the demo pipeline trains
    these in minutes on Fashion-MNIST.
    """

    def __init__(self, cfg: Sequence[int | str], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                width = int(v)
                layers += [conv3x3(channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (B, C_last)
        return self.classifier(x)  # (B, num_classes)


@register_model
def cnn_tiny(num_classes: int, in_channels: int = 3) -> PlainCNN:
    """Demo student: conv16-pool-conv32-pool-conv64-GAP-fc with BatchNorm (~24k parameters at 10 classes).

    Pooling early keeps it at ~2M multiply-adds per 28x28 image, so a CPU core trains it at several
    thousand images/s: the demo's ten students fit the 20-minute pipeline budget.
    """
    return PlainCNN([16, "M", 32, "M", 64], num_classes, in_channels)


@register_model
def cnn_small(num_classes: int, in_channels: int = 3) -> PlainCNN:
    """Demo teacher: conv32x2-pool-conv64x2-pool-conv128-GAP-fc with BatchNorm (~140k parameters at 10 classes)."""
    return PlainCNN([32, 32, "M", 64, 64, "M", 128], num_classes, in_channels)
