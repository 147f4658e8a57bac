"""Wide ResNets (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016: WRN-d-k, pre-activation blocks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import conv3x3, init_conv_bn
from .registry import register_model


class WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut (Zagoruyko & Komodakis 2016, Fig. 1c)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = conv3x3(out_planes, out_planes)
        self.equal_in_out = in_planes == out_planes and stride == 1
        # camelCase attribute name kept from the reference code so published state_dicts load unchanged.
        self.convShortcut: nn.Conv2d | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        # When the shape changes, the projection shortcut also sees the pre-activated input (as in the WRN code).
        shortcut = x if self.convShortcut is None else self.convShortcut(o)
        out = self.conv1(o)
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        return out + shortcut


class _WideStage(nn.Module):
    """A stage of WRN blocks; the ``.layer`` wrapper only exists so state_dict keys match the reference code."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        blocks = [
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(n)
        ]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016): depth = 6n+4, stage widths 16k, 32k, 64k, no dropout."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...); got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = conv3x3(in_channels, widths[0])
        self.block1 = _WideStage(n, widths[0], widths[1], 1)
        self.block2 = _WideStage(n, widths[1], widths[2], 2)
        self.block3 = _WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])  # final BN-ReLU: pre-activation blocks leave the sum un-normalized
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))  # (B, 64k, H/4, W/4)
        x = F.relu(self.bn1(x), inplace=True)
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def wrn_16_2(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-16-2 (Zagoruyko & Komodakis 2016)."""
    return WideResNet(16, 2, num_classes, in_channels)


@register_model
def wrn_40_1(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-40-1 (Zagoruyko & Komodakis 2016)."""
    return WideResNet(40, 1, num_classes, in_channels)


@register_model
def wrn_40_2(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-40-2 (Zagoruyko & Komodakis 2016)."""
    return WideResNet(40, 2, num_classes, in_channels)
