"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman, ICLR 2015), CRD's adaptation: no FC stack, one linear
classifier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import init_conv_bn
from .registry import register_model

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
        init_conv_bn(self)
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


@register_model(aliases=("vgg8_bn",))
def vgg8(num_classes: int, in_channels: int = 3) -> CifarVGG:
    """VGG-8 with BatchNorm (CRD's ``vgg8_bn``, one conv per block)."""
    return CifarVGG(_VGG_CFGS["vgg8"], num_classes, in_channels)


@register_model(aliases=("vgg13_bn",))
def vgg13(num_classes: int, in_channels: int = 3) -> CifarVGG:
    """VGG-13 with BatchNorm (configuration B of Simonyan & Zisserman 2015; CRD's ``vgg13_bn``)."""
    return CifarVGG(_VGG_CFGS["vgg13"], num_classes, in_channels)
