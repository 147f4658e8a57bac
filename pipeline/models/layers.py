"""Building blocks shared by the zoo families."""

from __future__ import annotations

import torch
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows, whose shift makes a bias redundant)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel shuffle of ShuffleNet (Zhang et al. 2018, Sec. 3.1): (N, g*c, H, W) -> interleave the g groups."""
    n, c, h, w = x.shape
    # (N, g, C/g, H, W) -> swap the group axes -> flatten: channel j of group i moves to position j*g + i.
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def init_conv_bn(model: nn.Module) -> None:
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
