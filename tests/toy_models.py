"""Small fx-traceable BN models for fast pipeline tests."""

import torch
from torch import nn

from pyzeroq.models.layers import Normalize, conv_bn


class TinyNet(nn.Module):
    """Normalize -> 3 x (conv, BN, ReLU) with a residual add -> pool -> linear."""

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize()
        self.c1 = conv_bn(1, width, 3, 2)
        self.r1 = nn.ReLU()
        self.c2 = conv_bn(width, width, 3)
        self.r2 = nn.ReLU()
        self.c3 = conv_bn(width, width, 3, groups=width)
        self.r3 = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.r1(self.c1(self.normalize(x)))
        x = self.r2(self.c2(x) + x)
        x = self.r3(self.c3(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def trained_tiny(seed: int = 0, steps: int = 60) -> TinyNet:
    """A TinyNet fitted for a few steps on random data so BN statistics are non-trivial."""
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.rand(32, 1, 16, 16, generator=g)
        y = (x.mean(dim=(1, 2, 3)) * 20).long().clamp(0, 9)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
