"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018) at width
multiplier 0.5: the literature's "MobileNetV2" student (CRD's ``mobile_half``)."""

from __future__ import annotations

import torch
from torch import nn

from .layers import init_conv_bn
from .registry import register_model


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
        init_conv_bn(self)
        nn.init.normal_(self.classifier[0].weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (B, 32w, H/2, W/2)
        for block in self.blocks:
            x = block(x)
        x = self.conv2(x)  # (B, 1280, H/16, W/16)
        return self.classifier(self.avgpool(x).flatten(1))


@register_model(aliases=("mobile_half", "mobilenet_v2"))
def mobilenetv2(num_classes: int, in_channels: int = 3) -> MobileNetV2:
    """MobileNetV2 at width 0.5, expansion 6: the KD literature's CIFAR student (CRD's ``mobile_half``)."""
    return MobileNetV2(num_classes, in_channels, width_mult=0.5, expand_ratio=6)
