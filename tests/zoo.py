"""Hand-written miniatures of the architectures users bring (torchvision cannot be imported beside
the CPU torch): the same op patterns at small widths and inputs, random weights, BatchNorm
statistics set to non-trivial values. Used by tests/test_zoo.py and bench/zoo_benchmark.py.

Each entry of :data:`ZOO`: name -> (constructor, input shape without the batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyzeroq.models import Normalize

CLASSES = 10
IMAGE = (3, 32, 32)


def bn(c: int, dims: int = 2) -> nn.Module:
    m = nn.BatchNorm2d(c) if dims == 2 else nn.BatchNorm1d(c)
    with torch.no_grad():
        m.running_mean.uniform_(-0.3, 0.3)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.6, 1.4)
        m.bias.uniform_(-0.2, 0.2)
    return m


def cbr(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: type = nn.ReLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), bn(cout)]
    return nn.Sequential(*layers, act()) if act is not None else nn.Sequential(*layers)


def norm3() -> Normalize:
    return Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ---------------------------------------------------------------------------- ResNets
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1, self.c2 = cbr(cin, cout, 3, stride), cbr(cout, cout, 3, 1, act=None)
        self.short = cbr(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.c2(self.c1(x)) + self.short(x))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        cout = mid * 4
        self.body = nn.Sequential(cbr(cin, mid, 1), cbr(mid, mid, 3, stride), cbr(mid, cout, 1, act=None))
        self.short = cbr(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.short(x))


class ResNet(nn.Module):
    """ImageNet layout: 7x7/2 stem, 3x3/2 max pool, four stages, global pool, fc."""

    def __init__(self, bottleneck: bool, blocks=(2, 2, 2, 2), width: int = 8):
        super().__init__()
        self.normalize = norm3()
        self.stem = cbr(3, width, 7, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            mid = width * 2 ** i
            for j in range(n):
                stride = 2 if j == 0 and i > 0 else 1
                layers.append(Bottleneck(cin, mid, stride) if bottleneck else BasicBlock(cin, mid, stride))
                cin = mid * 4 if bottleneck else mid
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, CLASSES)

    def forward(self, x):
        x = self.layers(self.pool(self.stem(self.normalize(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------- mobile nets
class InvertedResidual(nn.Module):
    """MobileNetV2 / V3 / EfficientNet block: expand 1x1, depthwise, [SE], project 1x1, residual."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, act: type = nn.ReLU6, se: bool = False,
                 kernel: int = 3, se_gate: type = nn.Hardsigmoid):
        super().__init__()
        mid = cin * expand
        self.expand = cbr(cin, mid, 1, act=act) if expand != 1 else nn.Identity()
        self.dw = cbr(mid, mid, kernel, stride, groups=mid, act=act)
        self.se = SqueezeExcite(mid, se_gate) if se else nn.Identity()
        self.project = cbr(mid, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, gate: type):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, max(c // 4, 2), 1), nn.Conv2d(max(c // 4, 2), c, 1)
        self.gate = gate()

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(F.relu(self.reduce(s))))


class MobileNet(nn.Module):
    """``version``: "v2" (ReLU6), "v3" (Hardswish, SE with Hardsigmoid), "effnet" (SiLU, SE with
    Sigmoid, 5x5 depthwise)."""

    def __init__(self, version: str = "v2", width: int = 8):
        super().__init__()
        act = {"v2": nn.ReLU6, "v3": nn.Hardswish, "effnet": nn.SiLU}[version]
        se = version != "v2"
        gate = nn.Sigmoid if version == "effnet" else nn.Hardsigmoid
        kernel = 5 if version == "effnet" else 3
        self.normalize = norm3()
        self.stem = cbr(3, width, 3, 2, act=act)
        cfg = [(width, 1, 1), (width * 2, 2, 4), (width * 2, 1, 4), (width * 4, 2, 4)]
        blocks, cin = [], width
        for cout, stride, expand in cfg:
            blocks.append(InvertedResidual(cin, cout, stride, expand, act, se, kernel, gate))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = cbr(cin, width * 8, 1, act=act)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(width * 8, CLASSES)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(self.normalize(x))))
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


# ---------------------------------------------------------------------------- ShuffleNetV2
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.left = nn.Sequential(cbr(cin, cin, 3, stride, groups=cin, act=None), cbr(cin, half, 1))
        self.right = nn.Sequential(cbr(cin if stride > 1 else half, half, 1),
                                   cbr(half, half, 3, stride, groups=half, act=None), cbr(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.right(b)), dim=1)
        else:
            out = torch.cat((self.left(x), self.right(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.normalize = norm3()
        self.stem = cbr(3, width, 3, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.units = nn.Sequential(ShuffleUnit(width, width * 2, 2), ShuffleUnit(width * 2, width * 2, 1),
                                   ShuffleUnit(width * 2, width * 4, 2), ShuffleUnit(width * 4, width * 4, 1))
        self.fc = nn.Linear(width * 4, CLASSES)

    def forward(self, x):
        x = self.units(self.pool(self.stem(self.normalize(x))))
        return self.fc(x.mean([2, 3]))


# ---------------------------------------------------------------------------- SqueezeNet, Inception
class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU(inplace=True))
        self.e1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU(inplace=True))
        self.e3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU(inplace=True))

    def forward(self, x):
        x = self.squeeze(x)
        return torch.cat([self.e1(x), self.e3(x)], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1 layout (no BN, max pools with ceil_mode=True, a conv classifier)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.normalize = norm3()
        self.features = nn.Sequential(
            nn.Conv2d(3, width * 2, 3, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(width * 2, width // 2, width), Fire(width * 2, width // 2, width), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(width * 2, width, width * 2))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(width * 4, CLASSES, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(self.normalize(x))), 1)


class InceptionBlock(nn.Module):
    def __init__(self, cin: int, width: int):
        super().__init__()
        self.b1 = cbr(cin, width, 1)
        self.b3 = nn.Sequential(cbr(cin, width, 1), cbr(width, width, 3))
        self.b5 = nn.Sequential(cbr(cin, width // 2, 1), cbr(width // 2, width, 5))
        self.bp = nn.Sequential(nn.AvgPool2d(3, 1, 1), cbr(cin, width, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class Inception(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.normalize = norm3()
        self.stem = cbr(3, width * 2, 3, 2)
        self.blocks = nn.Sequential(InceptionBlock(width * 2, width), nn.MaxPool2d(2),
                                    InceptionBlock(width * 4, width * 2))
        self.pool = nn.AdaptiveAvgPool2d(2)  # 8x8 -> 2x2 (kernel = stride = 4)
        self.fc = nn.Linear(width * 8 * 4, CLASSES)

    def forward(self, x):
        x = self.blocks(self.stem(self.normalize(x)))
        return self.fc(self.pool(x).flatten(1))


# ---------------------------------------------------------------------------- dense prediction
class UNet(nn.Module):
    """Segmentation: two downsampling stages, a ConvTranspose2d and a nearest upsampling, skip
    concatenations, a class map [N, K, H, W] as the output."""

    def __init__(self, width: int = 8, classes: int = 4):
        super().__init__()
        self.normalize = norm3()
        self.e1, self.e2 = cbr(3, width), cbr(width, width * 2, 3, 2)
        self.mid = cbr(width * 2, width * 4, 3, 2)
        self.up = nn.ConvTranspose2d(width * 4, width * 4, 2, 2)  # learned upsampling, then a nearest one
        self.d2 = cbr(width * 4 + width * 2, width * 2)
        self.d1 = cbr(width * 2 + width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        e1 = self.e1(self.normalize(x))
        e2 = self.e2(e1)
        m = self.mid(e2)
        d2 = self.d2(torch.cat([F.relu(self.up(m)), e2], 1))
        d1 = self.d1(torch.cat([F.interpolate(d2, scale_factor=2), e1], 1))
        return self.head(d1)


class TwoHeads(nn.Module):
    """A detector-style dict output: class and box maps from a shared trunk."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.normalize = norm3()
        self.trunk = nn.Sequential(cbr(3, width, 3, 2), cbr(width, width * 2, 3, 2))
        self.cls, self.box = nn.Conv2d(width * 2, CLASSES, 3, padding=1), nn.Conv2d(width * 2, 4, 3, padding=1)

    def forward(self, x):
        f = self.trunk(self.normalize(x))
        return {"cls": self.cls(f), "box": self.box(f)}


# ---------------------------------------------------------------------------- 1-D and MLP
class Normalize1d(nn.Module):
    def __init__(self, mean=(0.5,), std=(0.25,)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class AudioCNN(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.normalize = Normalize1d()

        def block(cin, cout, k, s, d=1):
            return nn.Sequential(nn.Conv1d(cin, cout, k, s, padding=d * (k // 2), dilation=d, bias=False),
                                 bn(cout, 1), nn.ReLU())
        self.features = nn.Sequential(block(1, width, 9, 4), block(width, width * 2, 3, 2),
                                      block(width * 2, width * 2, 3, 1, 2), block(width * 2, width * 4, 3, 2))
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(width * 4, CLASSES)

    def forward(self, x):
        return self.fc(self.pool(self.features(self.normalize(x))).flatten(1))


class MLP(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.normalize = Normalize(0.5, 0.25)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), bn(width, 1), nn.ReLU(),
                                 nn.Linear(width, width), bn(width, 1), nn.ReLU(), nn.Linear(width, CLASSES))

    def forward(self, x):
        return self.net(self.normalize(x))


ZOO = {
    "resnet18": (lambda: ResNet(False), IMAGE),
    "resnet50": (lambda: ResNet(True, (1, 1, 1, 1), 4), IMAGE),
    "mobilenetv2": (lambda: MobileNet("v2"), IMAGE),
    "mobilenetv3_small": (lambda: MobileNet("v3"), IMAGE),
    "efficientnet_b0": (lambda: MobileNet("effnet"), IMAGE),
    "shufflenetv2": (ShuffleNetV2, IMAGE),
    "squeezenet": (SqueezeNet, IMAGE),
    "inception": (Inception, IMAGE),
    "unet": (UNet, IMAGE),
    "two_heads": (TwoHeads, IMAGE),
    "audio_cnn": (AudioCNN, (1, 256)),
    "mlp_bn1d": (MLP, (1, 8, 8)),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The zoo model ``name`` with seeded random weights and BN statistics, in eval mode."""
    ctor, _ = ZOO[name]
    torch.manual_seed(seed)
    return ctor().eval()


class DenseNet(nn.Module):
    """DenseNet-style pre-activation: BN-ReLU-conv on concatenated features (BatchNorms that
    follow a concat, not a conv), transition BN-ReLU-1x1-avgpool."""

    def __init__(self, width: int = 4, growth: int = 4, layers: int = 3):
        super().__init__()
        self.normalize = norm3()
        self.stem = nn.Conv2d(3, width * 2, 3, 2, 1, bias=False)
        self.dense = nn.ModuleList()
        c = width * 2
        for _ in range(layers):
            self.dense.append(nn.Sequential(bn(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1, bias=False)))
            c += growth
        self.transition = nn.Sequential(bn(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2))
        self.final = nn.Sequential(bn(c // 2), nn.ReLU())
        self.fc = nn.Linear(c // 2, CLASSES)

    def forward(self, x):
        x = self.stem(self.normalize(x))
        for layer in self.dense:
            x = torch.cat([x, layer(x)], 1)
        x = self.final(self.transition(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


ZOO["densenet"] = (DenseNet, IMAGE)


def _fcos():
    from pyzeroq.detection.model import FCOSDetector

    model = FCOSDetector()
    for m in model.modules():  # untrained: BN statistics set as for every zoo model
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model


ZOO["fcos"] = (_fcos, (1, 96, 96))  # the project's detector: shared head per FPN level, per-level Scale, dict
