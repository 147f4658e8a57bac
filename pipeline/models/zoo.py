"""Model zoo: demo CNNs, the CIFAR zoo of the knowledge-distillation literature, torchvision models, checkpoints.

Every model takes a float tensor ``(B, in_channels, H, W)`` that is already normalized and returns logits
``(B, num_classes)``. Build one by name with :func:`build_model`; the names are the keys of :data:`MODELS`
(hyphenated aliases such as ``wrn-40-2`` and the CRD repo's names such as ``ShuffleV1`` are accepted too)
plus ``tv:<name>`` for any torchvision classification model (always built with ``weights=None``: this
module never downloads anything).

The CIFAR zoo follows the definitions of the CRD repository (Tian et al., "Contrastive Representation
Distillation", ICLR 2020, github.com/HobbitLong/RepDistiller), which the DKD (Zhao et al., CVPR 2022) and most later
logit-distillation papers reuse, so their published teacher/student numbers refer to exactly these networks:

- ResNets for CIFAR: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2 (6n+2 layers,
  three stages of 16/32/64 channels); ``x4`` variants widen the stages to 64/128/256 (CRD).
- Wide ResNets: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016 (WRN-d-k, pre-activation blocks).
- VGG with BatchNorm and one linear classifier: Simonyan & Zisserman, ICLR 2015, as adapted to CIFAR by CRD.
- MobileNetV2: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018, at width
  multiplier 0.5 (the literature's "MobileNetV2" student, CRD's ``mobile_half``).
- ShuffleNetV1: Zhang et al., "ShuffleNet", CVPR 2018 (g = 3); ShuffleNetV2: Ma et al., "ShuffleNet V2",
  ECCV 2018 (1x).

Module attribute names deliberately mirror the CRD definitions, so a ``state_dict`` trained with that code base
(e.g. its published CIFAR-100 teachers) loads here unchanged through :func:`load_state_dict_checkpoint`. All
zoo models end in adaptive average pooling instead of the original fixed-size pools, so they accept 32x32
(CIFAR) and 28x28 (Fashion-MNIST) inputs alike; at 32x32 this is numerically the same as the original.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODELS",
    "ALIASES",
    "TORCHVISION_PREFIX",
    "CheckpointError",
    "build_model",
    "canonical_arch",
    "count_parameters",
    "save_checkpoint",
    "load_checkpoint",
    "load_state_dict_checkpoint",
]

log = logging.getLogger(__name__)

TORCHVISION_PREFIX = "tv:"

# Keys that save_checkpoint owns; `extra` may not overwrite them (a clobbered "arch" would rebuild the wrong net).
_RESERVED_KEYS = ("arch", "num_classes", "in_channels", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint exists but does not fit: wrong architecture, missing/unexpected keys, or wrong shapes."""


# --------------------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------------------


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows, whose shift makes a bias redundant)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel shuffle of ShuffleNet (Zhang et al. 2018, Sec. 3.1): (N, g*c, H, W) -> interleave the g groups."""
    n, c, h, w = x.shape
    # (N, g, C/g, H, W) -> swap the group axes -> flatten: channel j of group i moves to position j*g + i.
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _init_conv_bn(model: nn.Module) -> None:
    """He-normal convolutions (fan_out, as in He et al. 2016 / torchvision), BatchNorm to identity, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------------------
# Demo CNNs for the default data set (Fashion-MNIST, 28x28x1, trained on 2 CPU cores)
# --------------------------------------------------------------------------------------------------------------


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
                layers += [_conv3x3(channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (B, C_last)
        return self.classifier(x)  # (B, num_classes)


def cnn_tiny(num_classes: int, in_channels: int = 3) -> PlainCNN:
    """Demo student: conv16-pool-conv32-pool-conv64-GAP-fc with BatchNorm (~24k parameters at 10 classes).

    Pooling early keeps it at ~2M multiply-adds per 28x28 image, so a CPU core trains it at several
    thousand images/s: the demo's ten students fit the 20-minute pipeline budget.
    """
    return PlainCNN([16, "M", 32, "M", 64], num_classes, in_channels)


def cnn_small(num_classes: int, in_channels: int = 3) -> PlainCNN:
    """Demo teacher: conv32x2-pool-conv64x2-pool-conv128-GAP-fc with BatchNorm (~140k parameters at 10 classes)."""
    return PlainCNN([32, 32, "M", 64, 64, "M", 128], num_classes, in_channels)


# --------------------------------------------------------------------------------------------------------------
# ResNet for CIFAR (He et al. 2016, Sec. 4.2), as defined in the KD literature (CRD)
# --------------------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Post-activation residual block: conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU (He et al. 2016)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
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
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(widths[0], widths[1], n, stride=1)
        self.layer2 = self._make_layer(widths[1], widths[2], n, stride=2)
        self.layer3 = self._make_layer(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _init_conv_bn(self)

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


def resnet8(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-8 (n=1) for CIFAR (He et al. 2016; CRD)."""
    return CifarResNet(8, (16, 16, 32, 64), num_classes, in_channels)


def resnet14(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-14 (n=2) for CIFAR (He et al. 2016; CRD)."""
    return CifarResNet(14, (16, 16, 32, 64), num_classes, in_channels)


def resnet20(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (n=3) for CIFAR (He et al. 2016)."""
    return CifarResNet(20, (16, 16, 32, 64), num_classes, in_channels)


def resnet32(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 (n=5) for CIFAR (He et al. 2016)."""
    return CifarResNet(32, (16, 16, 32, 64), num_classes, in_channels)


def resnet44(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-44 (n=7) for CIFAR (He et al. 2016)."""
    return CifarResNet(44, (16, 16, 32, 64), num_classes, in_channels)


def resnet56(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (n=9) for CIFAR (He et al. 2016)."""
    return CifarResNet(56, (16, 16, 32, 64), num_classes, in_channels)


def resnet110(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-110 (n=18) for CIFAR (He et al. 2016)."""
    return CifarResNet(110, (16, 16, 32, 64), num_classes, in_channels)


def resnet8x4(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-8 with 4x wider stages (32-64-128-256), the CRD student."""
    return CifarResNet(8, (32, 64, 128, 256), num_classes, in_channels)


def resnet32x4(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 with 4x wider stages (32-64-128-256), the CRD teacher."""
    return CifarResNet(32, (32, 64, 128, 256), num_classes, in_channels)


# --------------------------------------------------------------------------------------------------------------
# Wide ResNet (Zagoruyko & Komodakis 2016)
# --------------------------------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut (Zagoruyko & Komodakis 2016, Fig. 1c)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = _conv3x3(out_planes, out_planes)
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
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.block1 = _WideStage(n, widths[0], widths[1], 1)
        self.block2 = _WideStage(n, widths[1], widths[2], 2)
        self.block3 = _WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])  # final BN-ReLU: pre-activation blocks leave the sum un-normalized
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))  # (B, 64k, H/4, W/4)
        x = F.relu(self.bn1(x), inplace=True)
        return self.fc(self.avgpool(x).flatten(1))


def wrn_16_2(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-16-2 (Zagoruyko & Komodakis 2016)."""
    return WideResNet(16, 2, num_classes, in_channels)


def wrn_40_1(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-40-1 (Zagoruyko & Komodakis 2016)."""
    return WideResNet(40, 1, num_classes, in_channels)


def wrn_40_2(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-40-2 (Zagoruyko & Komodakis 2016)."""
    return WideResNet(40, 2, num_classes, in_channels)


# --------------------------------------------------------------------------------------------------------------
# VGG with BatchNorm for CIFAR (Simonyan & Zisserman 2015; CRD's adaptation: no FC stack, one linear classifier)
# --------------------------------------------------------------------------------------------------------------

_VGG_CFGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],  # CRD's configuration "S"
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],  # configuration "B"
}


class CifarVGG(nn.Module):
    """VGG-BN for small images: five conv blocks (3x3 conv with bias, BN, ReLU), max pools between, GAP, linear.

    As in CRD, only the first three pools run on 32x32 inputs (the fourth only for >= 64 px, e.g. Tiny-ImageNet), so
    the last block sees 4x4 maps; the last ReLU of each block is applied in ``forward`` rather than inside the block.
    """

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        blocks = []
        channels = in_channels
        for block_cfg in cfg:
            blocks.append(self._make_block(block_cfg, channels))
            channels = block_cfg[-1]
        self.block0, self.block1, self.block2, self.block3, self.block4 = blocks
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_conv_bn(self)
        # The reference initialises the classifier with N(0, 0.01): small logits at the start of training.
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)

    @staticmethod
    def _make_block(widths: Sequence[int], in_channels: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for w in widths:
            layers += [nn.Conv2d(in_channels, w, kernel_size=3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            in_channels = w
        # Drop the block's last ReLU (applied in forward): keeps the reference's layer indices in state_dict keys.
        return nn.Sequential(*layers[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big_input = x.shape[-2] >= 64
        x = self.pool(F.relu(self.block0(x)))  # (B, 64, H/2, W/2)
        x = self.pool(F.relu(self.block1(x)))  # (B, 128, H/4, W/4)
        x = self.pool(F.relu(self.block2(x)))  # (B, 256, H/8, W/8)
        x = F.relu(self.block3(x))  # (B, 512, H/8, W/8)
        if big_input:
            x = self.pool(x)
        x = F.relu(self.block4(x))
        return self.classifier(self.avgpool(x).flatten(1))


def vgg8(num_classes: int, in_channels: int = 3) -> CifarVGG:
    """VGG-8 with BatchNorm (CRD's ``vgg8_bn``, one conv per block)."""
    return CifarVGG(_VGG_CFGS["vgg8"], num_classes, in_channels)


def vgg13(num_classes: int, in_channels: int = 3) -> CifarVGG:
    """VGG-13 with BatchNorm (configuration B of Simonyan & Zisserman 2015; CRD's ``vgg13_bn``)."""
    return CifarVGG(_VGG_CFGS["vgg13"], num_classes, in_channels)


# --------------------------------------------------------------------------------------------------------------
# MobileNetV2 (Sandler et al. 2018), the CIFAR variant of the KD literature
# --------------------------------------------------------------------------------------------------------------


def _conv_bn_relu(inp: int, oup: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Inverted residual with linear bottleneck (Sandler et al. 2018, Table 1): 1x1 expand, 3x3 depthwise, 1x1 project.

    The projection has no ReLU (the "linear bottleneck"); the identity shortcut is used when shapes match. Unlike
    torchvision, the expansion conv is kept even at t=1 and ReLU (not ReLU6) is used, as in the CIFAR reference.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) for CIFAR: stride-2 stem, the paper's 7 bottleneck stages, 1x1 conv to 1280.

    ``width_mult`` scales every layer but the last 1x1 conv (kept at 1280 for multipliers <= 1, as in the paper).
    The KD literature's "MobileNetV2" is ``width_mult=0.5, expand_ratio=6`` (:func:`mobilenetv2`).
    """

    # (expansion t, output channels c, repeats n, first stride s): Sandler et al. 2018, Table 2, except that the
    # CIFAR reference gives the 24-channel stage stride 1 (not 2), so a 32x32 input ends at 2x2 instead of 1x1.
    # t=None means "the model's expand_ratio"; the first stage never expands (t=1).
    SETTINGS: tuple[tuple[int | None, int, int, int], ...] = (
        (1, 16, 1, 1),
        (None, 24, 2, 1),
        (None, 32, 3, 2),
        (None, 64, 4, 2),
        (None, 96, 3, 1),
        (None, 160, 3, 2),
        (None, 320, 1, 1),
    )

    def __init__(self, num_classes: int, in_channels: int = 3, width_mult: float = 1.0, expand_ratio: int = 6) -> None:
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in self.SETTINGS:
            out = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, expand_ratio if t is None else t))
                channels = out
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        _init_conv_bn(self)
        nn.init.normal_(self.classifier[0].weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (B, 32w, H/2, W/2)
        for block in self.blocks:
            x = block(x)
        x = self.conv2(x)  # (B, 1280, H/16, W/16)
        return self.classifier(self.avgpool(x).flatten(1))


def mobilenetv2(num_classes: int, in_channels: int = 3) -> MobileNetV2:
    """MobileNetV2 at width 0.5, expansion 6: the KD literature's CIFAR student (CRD's ``mobile_half``)."""
    return MobileNetV2(num_classes, in_channels, width_mult=0.5, expand_ratio=6)


# --------------------------------------------------------------------------------------------------------------
# ShuffleNetV1 (Zhang et al. 2018) and ShuffleNetV2 (Ma et al. 2018), CIFAR variants
# --------------------------------------------------------------------------------------------------------------


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
        out = _channel_shuffle(out, self.g)
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
        _init_conv_bn(self)

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
        return _channel_shuffle(torch.cat([x1, out], 1), 2)


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
        return _channel_shuffle(torch.cat([left, right], 1), 2)


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
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)  # (B, 24, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 464, H/8, W/8)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)  # (B, 1024, H/8, W/8)
        return self.linear(self.avgpool(x).flatten(1))


def shufflenetv1(num_classes: int, in_channels: int = 3) -> ShuffleNetV1:
    """ShuffleNetV1 1x, g=3 (Zhang et al. 2018), CIFAR variant (CRD's ``ShuffleV1``)."""
    return ShuffleNetV1(num_classes, in_channels)


def shufflenetv2(num_classes: int, in_channels: int = 3) -> ShuffleNetV2:
    """ShuffleNetV2 1x (Ma et al. 2018), CIFAR variant (CRD's ``ShuffleV2``)."""
    return ShuffleNetV2(num_classes, in_channels)


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------

MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn_tiny": cnn_tiny,
    "cnn_small": cnn_small,
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg13": vgg13,
    "mobilenetv2": mobilenetv2,
    "shufflenetv1": shufflenetv1,
    "shufflenetv2": shufflenetv2,
}

# Names other code bases use for the same networks (after lower-casing and '-' -> '_'), so configs copied from
# the CRD / DKD repositories work as they are.
ALIASES: dict[str, str] = {
    "mobile_half": "mobilenetv2",
    "mobilenet_v2": "mobilenetv2",
    "shufflev1": "shufflenetv1",
    "shufflev2": "shufflenetv2",
    "shufflenet_v1": "shufflenetv1",
    "shufflenet_v2": "shufflenetv2",
    "vgg8_bn": "vgg8",
    "vgg13_bn": "vgg13",
}


def _torchvision_names() -> list[str]:
    import torchvision.models  # deferred: importing torchvision costs ~1 s and most runs never need it

    return sorted(torchvision.models.list_models(module=torchvision.models))


def canonical_arch(arch: str) -> str:
    """The registry name for ``arch``: ``'WRN-40-2'`` -> ``'wrn_40_2'``, ``'ShuffleV1'`` -> ``'shufflenetv1'``.

    ``tv:<name>`` is returned with ``<name>`` lower-cased. Unknown names raise ``ValueError`` listing the options.
    """
    if not isinstance(arch, str) or not arch.strip():
        raise ValueError(f"architecture must be a non-empty string; got {arch!r}")
    name = arch.strip()
    if name.lower().startswith(TORCHVISION_PREFIX):
        tv_name = name[len(TORCHVISION_PREFIX) :].strip().lower()
        available = _torchvision_names()
        if tv_name not in available:
            raise ValueError(f"unknown torchvision model {tv_name!r} in {arch!r}; available: {available}")
        return TORCHVISION_PREFIX + tv_name
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in MODELS:
        raise ValueError(
            f"unknown architecture {arch!r}; available: {sorted(MODELS)} "
            f"(hyphenated aliases such as 'wrn-40-2' work too), or '{TORCHVISION_PREFIX}<name>' for a torchvision "
            f"model, e.g. '{TORCHVISION_PREFIX}resnet18'"
        )
    return key


def _build_torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A torchvision classification model with random weights (``weights=None``: never downloads anything)."""
    import torchvision.models

    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name in ("inception_v3", "googlenet"):
        # Their auxiliary heads make the training-mode output a namedtuple; every caller here expects plain logits.
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True  # the models' own init, stated explicitly (silences a FutureWarning)
    model = torchvision.models.get_model(name, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, name, in_channels)
    return model


def _replace_first_conv(model: nn.Module, name: str, in_channels: int) -> None:
    """Swap the stem convolution (the first Conv2d registered) for one taking ``in_channels`` inputs.

    torchvision's classifiers register their stem first, so this is the layer that sees the image; everything else
    (kernel, stride, padding, bias) is kept.
    """
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                break
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                1,
                module.bias is not None,
                module.padding_mode,
            )
            parent_name, _, attr = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            return
    raise ValueError(f"cannot adapt torchvision model {name!r} to in_channels={in_channels}: no plain stem Conv2d")


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build ``arch`` (a :data:`MODELS` key, an alias such as ``wrn-40-2``, or ``tv:<torchvision name>``).

    The model maps a normalized float batch ``(B, in_channels, H, W)`` to logits ``(B, num_classes)``; weights are
    randomly initialised. Raises ``ValueError`` for an unknown name (listing the available ones) or bad sizes.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int; got {in_channels!r}")
    name = canonical_arch(arch)
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(name[len(TORCHVISION_PREFIX) :], num_classes, in_channels)
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (BatchNorm affine weights included, buffers excluded), as papers report it."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DataParallel/DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _check_plain(value: Any, where: str) -> None:
    """Reject values ``torch.load(weights_only=True)`` would refuse, at save time rather than at every load."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint extra {where} has a key of type {type(k).__name__}; use str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"checkpoint extra {where} is a {type(value).__name__}; checkpoints hold only None/bool/int/float/str, "
        "tensors and lists/dicts of those (convert numpy scalars with float()/int())"
    )


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    arch: str,
    num_classes: int,
    in_channels: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{"arch", "num_classes", "in_channels", "state_dict", **extra}`` to ``path`` atomically.

    The file is written to a temporary name in the same directory and ``os.replace``-d into place, so a crash
    never leaves a truncated checkpoint that a later DVC stage would take for a finished one. ``arch`` is stored
    in canonical form; tensors are stored on the CPU so the file loads on machines without the training device.
    """
    path = Path(path)
    name = canonical_arch(arch)
    extra = dict(extra or {})
    clash = [k for k in _RESERVED_KEYS if k in extra]
    if clash:
        raise ValueError(f"checkpoint extra may not contain the reserved keys {clash}")
    for key, value in extra.items():
        if not isinstance(key, str):
            raise TypeError(f"checkpoint extra keys must be str; got {key!r}")
        _check_plain(value, repr(key))
    state_dict = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    payload = {
        "arch": name,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "state_dict": state_dict,
        **extra,
    }

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    log.info("saved %s checkpoint (%d parameters) to %s", name, count_parameters(model), path)
    return path


def _missing_file_error(path: Path, hint: str) -> FileNotFoundError:
    return FileNotFoundError(f"checkpoint not found: {path}. {hint}")


def _torch_load(path: Path, map_location: Any) -> Any:
    # weights_only=True: a checkpoint a user brings is untrusted input, and full unpickling could run arbitrary code.
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises a zoo of types (UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def _first(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in total)"


def _load_strict(model: nn.Module, state_dict: Mapping[str, Any], path: Path, arch: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file and the first offending keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if not problems:
        mismatched = [
            f"{k}: file {tuple(getattr(state_dict[k], 'shape', ()))} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if not isinstance(state_dict[k], torch.Tensor) or state_dict[k].shape != v.shape
        ]
        if mismatched:
            problems.append(f"shape mismatches [{'; '.join(mismatched[:5])}] ({len(mismatched)} in total)")
    if problems:
        raise CheckpointError(
            f"state_dict in {path} does not fit architecture {arch!r}: {'; '.join(problems)}. Check the "
            "architecture name, num_classes and in_channels the checkpoint was trained with."
        )
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint(
    path: str | os.PathLike[str], expected_arch: str | None = None, map_location: Any = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a :func:`save_checkpoint` file: rebuild the stored architecture, load its weights, return it in eval mode.

    Returns ``(model, meta)`` where ``meta`` is everything in the file but ``state_dict``. The model is put in
    ``eval()`` mode because a loaded checkpoint here is a teacher: a teacher left in train mode would update its
    BatchNorm statistics and emit batch-dependent logits; call ``.train()`` to fine-tune instead.

    Raises ``FileNotFoundError`` (saying how to produce the file), ``CheckpointError`` if ``expected_arch`` differs
    from the stored one (naming both) or the weights do not fit (naming missing/unexpected keys and the file).
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(
            path,
            "Produce it with `dvc repro train_teacher@<name>` for a demo teacher, or point "
            "teachers.<name>.checkpoint in params.yaml at your own checkpoint.",
        )
    payload = _torch_load(path, map_location)
    if not isinstance(payload, dict) or any(k not in payload for k in _RESERVED_KEYS):
        raise CheckpointError(
            f"{path} is not a kdcache checkpoint (it needs {list(_RESERVED_KEYS)} entries); for a bare state_dict "
            "use load_state_dict_checkpoint(path, arch, num_classes, in_channels)"
        )
    try:
        stored = canonical_arch(payload["arch"])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from exc
    if expected_arch is not None and canonical_arch(expected_arch) != stored:
        raise CheckpointError(
            f"checkpoint {path} holds architecture {payload['arch']!r}, but {expected_arch!r} was expected; "
            "fix the architecture in params.yaml or retrain the teacher"
        )
    num_classes, in_channels = int(payload["num_classes"]), int(payload["in_channels"])
    model = build_model(stored, num_classes, in_channels)
    _load_strict(model, payload["state_dict"], path, stored)
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model.eval(), meta


# Containers other trainers wrap a state_dict in: CRD/DKD save {"model": ...}, Lightning and many others
# {"state_dict": ...}; DataParallel/DDP prefix keys with "module.", torch.compile with "_orig_mod.".
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_KEY_PREFIXES = ("module.", "_orig_mod.")


def _extract_state_dict(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    state = payload
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        top = sorted(map(str, payload))[:10] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} holds no state_dict: expected a mapping of parameter names to tensors, or one under "
            f"{list(_WRAPPER_KEYS)}; found {top}"
        )
    for prefix in _KEY_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_state_dict_checkpoint(
    path: str | os.PathLike[str], arch: str, num_classes: int, in_channels: int = 3, map_location: Any = "cpu"
) -> nn.Module:
    """Build ``arch`` and load a user's own weights file into it; return the model in eval mode (it is a teacher).

    Accepts a bare ``state_dict``, one wrapped under ``"state_dict"``/``"model"``/``"model_state_dict"``/``"net"``
    (e.g. CRD's and DKD's published CIFAR teachers), with DataParallel's ``module.`` prefix stripped, or a
    :func:`save_checkpoint` file (whose stored architecture must then equal ``arch``).
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path, "Set teachers.<name>.checkpoint in params.yaml to an existing state_dict file.")
    payload = _torch_load(path, map_location)
    name = canonical_arch(arch)
    if isinstance(payload, dict) and isinstance(payload.get("arch"), str) and "state_dict" in payload:
        stored = canonical_arch(payload["arch"])
        if stored != name:
            raise CheckpointError(
                f"checkpoint {path} holds architecture {payload['arch']!r}, but {arch!r} was requested"
            )
    model = build_model(name, num_classes, in_channels)
    _load_strict(model, _extract_state_dict(payload, path), path, name)
    return model.eval()
