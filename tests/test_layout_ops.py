"""Layout ops on quantized tensors (pyzeroq.layout_ops): the codes move, the record stays.

ShuffleNet's channel shuffle (``view`` with size arithmetic, ``transpose``, ``contiguous``),
``chunk`` / ``split`` items, ``permute`` and nearest upsampling (``nn.Upsample`` /
``F.interpolate``), each end to end: no float op, integer codes equal to the fake-quant
model's, onnxruntime equal to the integer model, save / load.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_integer_convert import images, quantize
from test_ops_coverage import WIDTH, _conv, check_all
from torch import nn

import pyzeroq as zq
from pyzeroq.integer import steps as S
from pyzeroq.layout_ops import apply_layout, slice_bounds
from pyzeroq.models import Normalize

CLASSES = 10
GROUPS = 2


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleNet(nn.Module):
    """ShuffleNetV2-style unit: chunk, a branch, cat, channel shuffle; then a split with sizes,
    a permute round trip, nearest upsampling (module and functional)."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize()
        self.stem = _conv(1, WIDTH, 2)
        self.branch = nn.Sequential(_conv(WIDTH // 2, WIDTH // 2), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.mix = _conv(WIDTH, WIDTH, 2)
        self.mix2 = _conv(WIDTH, WIDTH, 2)
        self.fc = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        x = F.relu(self.stem(self.normalize(x)))
        a, b = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat([a, self.branch(b)], 1), GROUPS)
        p, q = torch.split(x, [3, WIDTH - 3], dim=1)
        x = torch.cat([q, p], 1).permute(0, 2, 3, 1).permute(0, 3, 1, 2)
        x = self.mix(self.up(x)) + self.mix2(F.interpolate(x, scale_factor=2))
        x = F.relu(x)
        return self.fc(x.mean((2, 3)))


def test_shufflenet_unit_end_to_end(tmp_path):
    torch.manual_seed(0)
    q = quantize(ShuffleNet())
    im = check_all(q, tmp_path, {"layout", "reshape", "concat"})
    ops = sorted(s.op for s in im.steps if isinstance(s, S.LayoutStep))
    assert ops == ["chunk", "chunk", "permute", "permute", "split", "split", "transpose", "upsample", "upsample"]
    views = [s for s in im.steps if isinstance(s, S.ReshapeStep) and s.shape is not None]
    # view(b, g, c // g, h, w): sizes read at run time, not frozen at the traced shape
    assert views[0].shape[0] == "batch" and views[0].shape[2] == ("floordiv", ("size", 0, 1), GROUPS)
    # the second view reads the sizes of the tensor before the transpose
    assert views[1].inputs[1] == views[0].inputs[0]


def test_view_sizes_follow_the_input_size():
    """A fully convolutional view(b, g, c // g, h, w) keeps working at another input size."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize, self.c = Normalize(), _conv(1, WIDTH)

        def forward(self, x):
            return channel_shuffle(F.relu(self.c(self.normalize(x))), GROUPS)

    q = quantize(Net())
    im = zq.to_integer(q)
    for size in (28, 12):
        x = images(2)[:, :, :size, :size]
        with torch.no_grad():
            want = q(x)
        got = im(x)
        assert got.shape == want.shape == (2, WIDTH, size, size)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 12), n=st.integers(1, 5), data=st.data())
def test_chunk_and_split_bounds_match_torch(size, n, data):
    x = torch.arange(size * 2).reshape(2, size)
    for i, part in enumerate(torch.chunk(x, n, dim=1)):
        assert slice_bounds("chunk", (1, n, i), size) == (int(part[0, 0]), int(part[0, -1]) + 1)
        np.testing.assert_array_equal(apply_layout("chunk", (-1, n, i), x.numpy()), part.numpy())
    for i, part in enumerate(torch.split(x, n, dim=1)):
        np.testing.assert_array_equal(apply_layout("split", (1, n, i), x.numpy()), part.numpy())
    sizes = data.draw(st.lists(st.integers(0, size), min_size=1, max_size=4).filter(lambda v: sum(v) == size)
                      if size <= 8 else st.just([size]))
    for i, part in enumerate(torch.split(x, sizes, dim=1)):
        np.testing.assert_array_equal(apply_layout("split", (1, tuple(sizes), i), x.numpy()), part.numpy())


@pytest.mark.parametrize("factor", [(2, 2), (4, 4), (1, 2)])
def test_upsample_is_nearest_replication(factor):
    x = torch.randint(0, 255, (2, 3, 4, 5), dtype=torch.uint8)
    want = F.interpolate(x.float(), scale_factor=factor, mode="nearest").to(torch.uint8)
    np.testing.assert_array_equal(apply_layout("upsample", factor, x.numpy()), want.numpy())


def test_a_layer_called_twice_runs_as_one_copy_per_call(tmp_path):
    """A conv shared by two calls, each call followed by its own BatchNorm, and a per-channel
    Scale after a shared conv (FCOS's head): one copy per call, BNs and scales folded."""
    torch.manual_seed(0)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize, self.c = Normalize(), nn.Conv2d(1, 1, 3, padding=1)
            self.head, self.scales = nn.Conv2d(1, WIDTH, 3, padding=1), nn.ParameterList(
                [nn.Parameter(torch.tensor(1.5)), nn.Parameter(torch.rand(1, WIDTH, 1, 1) + 0.5)])
            self.bns = nn.ModuleList([nn.BatchNorm2d(1), nn.BatchNorm2d(1)])
            self.fc = nn.Linear(2 * WIDTH, CLASSES)
            with torch.no_grad():
                for bn in self.bns:
                    bn.running_mean.uniform_(-0.3, 0.3)

        def forward(self, x):
            x = self.normalize(x)
            a = torch.relu(self.bns[0](self.c(x)))
            b = torch.relu(self.bns[1](self.c(a)))
            ya, yb = self.head(a) * self.scales[0], self.head(b) * self.scales[1]
            return self.fc(torch.cat([ya, yb], 1).mean((2, 3)))

    q = quantize(Shared())
    assert len(q.report.layers) == 5 and set(q.report.folded_bn.values()) == {"c", "c_call1"}
    assert any("called more than once" in n for n in q.report.notes)
    check_all(q, tmp_path, {"conv", "concat"})


def test_unsupported_interpolation_is_listed():
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return F.interpolate(self.c(x), scale_factor=2, mode="bilinear")

    with pytest.raises(ValueError, match="interpolate"):
        quantize(Bilinear())


def test_zero_padding_asymmetric(tmp_path):
    """TF-style 'same' for a strided conv: ZeroPad2d((0, 1, 0, 1)) then an unpadded conv; and F.pad."""
    torch.manual_seed(0)

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize, self.pad = Normalize(), nn.ZeroPad2d((0, 1, 0, 1))
            self.c1 = nn.Conv2d(1, WIDTH, 3, 2)
            self.c2 = nn.Conv2d(WIDTH, WIDTH, 3)
            self.fc = nn.Linear(WIDTH, CLASSES)

        def forward(self, x):
            x = torch.relu(self.c1(self.pad(self.normalize(x))))
            x = torch.relu(self.c2(F.pad(x, (1, 1, 2, 0))))
            return self.fc(x.mean((2, 3)))

    q = quantize(Padded())
    im = check_all(q, tmp_path, {"layout"})
    pads = [s for s in im.steps if isinstance(s, S.LayoutStep) and s.op == "pad"]
    assert [s.args for s in pads] == [(0, 1, 0, 1), (1, 1, 2, 0)]
    x = np.arange(6, dtype=np.uint8).reshape(1, 1, 2, 3)
    np.testing.assert_array_equal(apply_layout("pad", (1, 0, 0, 2), x, 7),
                                  F.pad(torch.from_numpy(x), (1, 0, 0, 2), value=7).numpy())


def test_size_products_are_not_tensor_products(tmp_path):
    """``h * w`` of ``x.shape`` entries is shape arithmetic (a Python int at run time), not an
    elementwise product of activations (was: compiled as a MulStep and refused)."""
    torch.manual_seed(0)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize, self.c = Normalize(), _conv(1, WIDTH, 2)
            self.fc = nn.Linear(WIDTH, CLASSES)

        def forward(self, x):
            y = torch.relu(self.c(self.normalize(x)))
            b, c, h, w = y.shape
            t = y.view(b, c, h * w).transpose(1, 2)  # [N, HW, C]
            return self.fc(t).mean(1) if False else self.fc(t.flatten(0, 1)).view(b, h * w, CLASSES)

    q = quantize(Tokens())
    im = check_all(q, tmp_path, {"layout", "reshape"}, x=images(4))
    views = [s for s in im.steps if isinstance(s, S.ReshapeStep) and s.shape is not None]
    assert ("mul", ("size", 0, 2), ("size", 0, 3)) in views[0].shape
    assert im(images(2)).shape == (2, 14 * 14, CLASSES)
