"""CIFAR-style ResNet-20 (He et al. 2016) for 1-channel 28x28 inputs."""

from __future__ import annotations

import torch
from torch import nn

from .layers import Normalize, conv_bn

RESNET20_WIDTHS = (16, 32, 64)
RESNET20_BLOCKS_PER_STAGE = 3


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(in_ch, out_ch, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2 = conv_bn(out_ch, out_ch, 3)
        # 1x1 conv + BN projection when the shape changes, identity otherwise
        self.shortcut = conv_bn(in_ch, out_ch, 1, stride) if (stride != 1 or in_ch != out_ch) else nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu1(self.conv1(x)))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.normalize = Normalize()
        self.stem = conv_bn(in_channels, RESNET20_WIDTHS[0], 3)
        self.stem_relu = nn.ReLU()
        blocks = []
        in_ch = RESNET20_WIDTHS[0]
        for stage, width in enumerate(RESNET20_WIDTHS):
            for i in range(RESNET20_BLOCKS_PER_STAGE):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(in_ch, width, stride))
                in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_relu(self.stem(self.normalize(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(num_classes: int = 10) -> ResNet20:
    return ResNet20(num_classes)
