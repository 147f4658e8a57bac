"""ShuffleNetV1 (Zhang et al., "ShuffleNet", CVPR 2018; g = 3) and ShuffleNetV2 (Ma et al., "ShuffleNet V2",
ECCV 2018; 1x), the CIFAR variants of the KD literature (CRD)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import channel_shuffle, init_conv_bn
from .registry import register_model


class ShuffleV1Unit(nn.Module):
    """ShuffleNet unit (Zhang et al. 2018, Fig. 2b/c): 1x1 group conv, shuffle, 3x3 depthwise, 1x1 group conv.

    With stride 2 the shortcut is a 3x3 average pool and the two branches are concatenated (Fig. 2c), so the
    residual branch produces ``out_planes - in_planes`` channels (the caller passes that as ``out_planes``).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, first: bool = False) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        # The paper does not group the first pointwise conv of stage 2: its 24 input channels are too few.
        self.g = 1 if first else groups
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=1, groups=self.g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = channel_shuffle(out, self.g)
        # Zhang et al. (Sec. 3.2) put no ReLU after the depthwise conv; the CRD reference does, and the published
        # CIFAR-100 results (and CRD-trained weights) come from that variant, so we follow the reference.
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    """ShuffleNet 1x, g=3 (Zhang et al. 2018, Table 1: stages of 240/480/960 channels, 4/8/4 units), CIFAR stem.

    The CIFAR variant replaces the ImageNet 3x3/2 stem conv and max pool by a 1x1 conv, so 32x32 ends at 4x4.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        out_planes: Sequence[int] = (240, 480, 960),
        num_blocks: Sequence[int] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups, first=True)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[2], num_classes)
        init_conv_bn(self)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int, first: bool = False) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            # The first unit concatenates its (pooled) input, so its branch only adds out_planes - in_planes.
            branch = out_planes - self.in_planes if i == 0 else out_planes
            layers.append(ShuffleV1Unit(self.in_planes, branch, 2 if i == 0 else 1, groups, first=first and i == 0))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)  # (B, 24, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 960, H/8, W/8)
        return self.linear(self.avgpool(x).flatten(1))


class ShuffleV2Unit(nn.Module):
    """ShuffleNetV2 basic unit (Ma et al. 2018, Fig. 3c): channel split, 1x1-dw3x3-1x1 on one half, concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        x1, x2 = x[:, :half], x[:, half:]
        out = F.relu(self.bn1(self.conv1(x2)), inplace=True)
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)), inplace=True)
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class ShuffleV2DownUnit(nn.Module):
    """ShuffleNetV2 spatial down-sampling unit (Ma et al. 2018, Fig. 3d): two stride-2 branches, concat, shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch: depthwise 3x3/2, then 1x1
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch: 1x1, depthwise 3x3/2, 1x1
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)), inplace=True)
        right = F.relu(self.bn3(self.conv3(x)), inplace=True)
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)), inplace=True)
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 1x (Ma et al. 2018, Table 5: 116/232/464 channels, 3/7/3 units, 1x1 conv to 1024), CIFAR stem.

    As in the CRD reference each stage is one down-sampling unit followed by ``num_blocks`` basic units.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        out_channels: Sequence[int] = (116, 232, 464, 1024),
        num_blocks: Sequence[int] = (3, 7, 3),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        stage_in = 24
        stages = []
        for out, n in zip(out_channels[:3], num_blocks, strict=True):
            stages.append(nn.Sequential(ShuffleV2DownUnit(stage_in, out), *[ShuffleV2Unit(out) for _ in range(n)]))
            stage_in = out
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_channels[3], num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)  # (B, 24, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 464, H/8, W/8)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)  # (B, 1024, H/8, W/8)
        return self.linear(self.avgpool(x).flatten(1))


@register_model(aliases=("shufflev1", "shufflenet_v1"))
def shufflenetv1(num_classes: int, in_channels: int = 3) -> ShuffleNetV1:
    """ShuffleNetV1 1x, g=3 (Zhang et al. 2018), CIFAR variant (CRD's ``ShuffleV1``)."""
    return ShuffleNetV1(num_classes, in_channels)


@register_model(aliases=("shufflev2", "shufflenet_v2"))
def shufflenetv2(num_classes: int, in_channels: int = 3) -> ShuffleNetV2:
    """ShuffleNetV2 1x (Ma et al. 2018), CIFAR variant (CRD's ``ShuffleV2``)."""
    return ShuffleNetV2(num_classes, in_channels)
