"""MobileNetV2-style network (Sandler et al. 2018) sized for 28x28 inputs."""

from __future__ import annotations

import torch
from torch import nn

from .layers import Normalize, conv_bn

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2,
# shortened for 28x28 inputs: stride-2 stem (28 -> 14), one more stride 2 (14 -> 7).
MOBILENETV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 1), (6, 64, 2, 1), (6, 96, 1, 1))
MOBILENETV2_STEM = 16
MOBILENETV2_STEM_STRIDE = 2
MOBILENETV2_LAST = 320


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        layers = []
        if expansion != 1:
            layers += [conv_bn(in_ch, hidden, 1), nn.ReLU6()]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(),
                   conv_bn(hidden, out_ch, 1)]  # linear bottleneck: no activation
        self.body = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.use_residual:
            return x + out
        return out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.normalize = Normalize()
        self.stem = conv_bn(in_channels, MOBILENETV2_STEM, 3, MOBILENETV2_STEM_STRIDE)
        self.stem_act = nn.ReLU6()
        blocks = []
        in_ch = MOBILENETV2_STEM
        for t, c, n, s in MOBILENETV2_SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(in_ch, MOBILENETV2_LAST, 1)
        self.head_act = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(MOBILENETV2_LAST, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self.stem(self.normalize(x)))
        x = self.head_act(self.head(self.blocks(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def mobilenetv2(num_classes: int = 10) -> MobileNetV2:
    return MobileNetV2(num_classes)
