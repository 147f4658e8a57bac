"""ResNets for CIFAR (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2:
6n+2 layers, three stages of 16/32/64 channels), as defined in the KD literature (CRD); ``x4`` variants widen
the stages to 64/128/256."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import conv3x3, init_conv_bn
from .registry import register_model


class BasicBlock(nn.Module):
    """Post-activation residual block: conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU (He et al. 2016)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            # The KD literature uses projection shortcuts (He et al.'s option B: 1x1 conv + BN) where the shape
            # changes, not the paper's zero-padding option A; the published parameter counts include them.
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity, inplace=True)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images (He et al. 2016, Sec. 4.2): a 3x3 stem, three stages of n basic blocks.

    ``widths = (stem, stage1, stage2, stage3)``: ``(16, 16, 32, 64)`` for resnet20/32/56/110, ``(32, 64, 128, 256)``
    for CRD's 4x-wide resnet8x4/resnet32x4. Stages 2 and 3 halve the resolution (32 -> 16 -> 8).
    """

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110, ...); got {depth}")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(widths[0], widths[1], n, stride=1)
        self.layer2 = self._make_layer(widths[1], widths[2], n, stride=2)
        self.layer3 = self._make_layer(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_conv_bn(self)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)  # (B, w0, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, w3, H/4, W/4)
        x = self.avgpool(x).flatten(1)  # (B, w3)
        return self.fc(x)


@register_model
def resnet8(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-8 (n=1) for CIFAR (He et al. 2016; CRD)."""
    return CifarResNet(8, (16, 16, 32, 64), num_classes, in_channels)


@register_model
def resnet14(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-14 (n=2) for CIFAR (He et al. 2016; CRD)."""
    return CifarResNet(14, (16, 16, 32, 64), num_classes, in_channels)


@register_model
def resnet20(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (n=3) for CIFAR (He et al. 2016)."""
    return CifarResNet(20, (16, 16, 32, 64), num_classes, in_channels)


@register_model
def resnet32(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 (n=5) for CIFAR (He et al. 2016)."""
    return CifarResNet(32, (16, 16, 32, 64), num_classes, in_channels)


@register_model
def resnet44(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-44 (n=7) for CIFAR (He et al. 2016)."""
    return CifarResNet(44, (16, 16, 32, 64), num_classes, in_channels)


@register_model
def resnet56(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (n=9) for CIFAR (He et al. 2016)."""
    return CifarResNet(56, (16, 16, 32, 64), num_classes, in_channels)


@register_model
def resnet110(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-110 (n=18) for CIFAR (He et al. 2016)."""
    return CifarResNet(110, (16, 16, 32, 64), num_classes, in_channels)


@register_model
def resnet8x4(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-8 with 4x wider stages (32-64-128-256), the CRD student."""
    return CifarResNet(8, (32, 64, 128, 256), num_classes, in_channels)


@register_model
def resnet32x4(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 with 4x wider stages (32-64-128-256), the CRD teacher."""
    return CifarResNet(32, (32, 64, 128, 256), num_classes, in_channels)
