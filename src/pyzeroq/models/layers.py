"""Building blocks shared by the reference models."""

from __future__ import annotations

import torch
from torch import nn

# Fashion-MNIST training-set statistics of pixels scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


class Normalize(nn.Module):
    """(x - mean) / std with per-channel buffers; the first module of every reference model.

    Keeping normalization inside the model lets integer-only inference start from raw
    uint8 pixels (scale 1/255, zero point 0) and lets quantizers read the constants.
    """

    def __init__(self, mean=(FASHION_MNIST_MEAN,), std=(FASHION_MNIST_STD,)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) followed by BatchNorm; padding keeps 'same' size at stride 1."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    )
