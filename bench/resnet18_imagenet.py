"""A minimal ImageNet-style ResNet-18 (He et al. 2016, Table 1; torchvision's layout) for the
distillation benchmark: 224x224 RGB input, BasicBlocks [2, 2, 2, 2], random weights, BN running
statistics warmed on random data (torchvision cannot be imported here, and there are no
pretrained weights). Only the speed of distillation is measured with it, never accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SIZE = 224
NUM_CLASSES = 1000
STEM_CHANNELS = 64
STAGE_CHANNELS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = (2, 2, 2, 2)
WARMUP_BATCHES = 2
WARMUP_BATCH_SIZE = 8
# ImageNet input normalization (the usual per-channel mean / std of RGB in [0, 1])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers ``mean`` / ``std`` as distill.find_normalizer expects."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], STEM_CHANNELS
        for i, (cout, blocks) in enumerate(zip(STAGE_CHANNELS, BLOCKS_PER_STAGE)):
            stride = 1 if i == 0 else 2
            layers = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_warmed(seed: int = 0) -> ResNet18:
    """Random-init ResNet-18 (seeded), BN running statistics = the cumulative average over
    ``WARMUP_BATCHES`` batches of uniform random images; returned in eval mode."""
    torch.manual_seed(seed)
    model = ResNet18()
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative moving average
    model.train()
    with torch.no_grad():
        for _ in range(WARMUP_BATCHES):
            model(torch.rand(WARMUP_BATCH_SIZE, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator))
    return model.eval()
