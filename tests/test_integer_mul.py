"""Integer elementwise product (squeeze-excite gating): the C++ kernel vs independent numpy
references in every requantization mode, constructed ties, broadcasting, and an SE block end to
end (fake-quant, integer, onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_integer_conv import ref_requant_dyadic, ref_requant_gemmlowp
from test_integer_convert import images, quantize
from test_ops_coverage import WIDTH, _conv, check_all
from torch import nn

import pyzeroq.integer as zi
from pyzeroq.integer import steps as S
from pyzeroq.models import Normalize

ROUNDINGS = ["float32_rne", "gemmlowp", "dyadic"]


def ref_qmul(a, sa, za, b, sb, zb, sy, zy, rounding, lo=0, hi=255, dyadic_rounding="half_even"):
    a, b = np.broadcast_arrays(a.astype(np.int64) - za, b.astype(np.int64) - zb)
    sa, sb, sy = np.float32(sa), np.float32(sb), np.float32(sy)
    if rounding == "float32_rne":  # the fake-quant model's float formula
        prod = ((sa * a.astype(np.float32)) * (sb * b.astype(np.float32))).astype(np.float32)
        f = np.clip((prod / sy).astype(np.float32), np.float32(lo - zy), np.float32(hi - zy))
        return np.rint(f).astype(np.int64) + zy
    acc = (a * b).reshape(1, -1)
    m64 = np.array([float(sa) * float(sb) / float(sy)])
    if rounding == "gemmlowp":
        return ref_requant_gemmlowp(acc, m64, zy, lo, hi, axis=0).reshape(a.shape)
    return ref_requant_dyadic(acc, m64, zy, lo, hi, axis=0, mode=dyadic_rounding).reshape(a.shape)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("gate_shape", [(3, 8, 5, 5), (3, 8, 1, 1)])
def test_qmul_matches_numpy(rounding, relu, gate_shape):
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (3, 8, 5, 5), dtype=np.uint8)
    b = rng.integers(0, 256, gate_shape, dtype=np.uint8)
    for sa, sb, sy in [(0.02, 0.004, 0.01), (0.1, 0.013, 0.09), (0.5, 0.5, 1.0), (0.03, 1 / 255, 0.011)]:
        got = zi.qmul(a, sa, 120, b, sb, 7, sy, 100, rounding=rounding, relu=relu)
        want = ref_qmul(a, sa, 120, b, sb, 7, sy, 100, rounding, lo=100 if relu else 0)
        assert got.shape == a.shape and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want, err_msg=str((sa, sb, sy)))


def test_qmul_constructed_ties():
    # sa = sb = 0.5, sy = 1: y = (a - za)(b - zb) / 4 lands on k + 0.5 when the product is 2 mod 4
    a = np.arange(0, 256, dtype=np.uint8)
    b = np.full(256, 2, np.uint8)
    p = (a.astype(np.int64) - 40) * 2 / 4  # (a - 40) / 2: every odd a - 40 is a tie
    assert (np.abs(p - np.floor(p)) == 0.5).sum() == 128
    for rounding in ("float32_rne", "dyadic"):
        got = zi.qmul(a, 0.5, 40, b, 0.5, 0, 1.0, 60, rounding=rounding)
        np.testing.assert_array_equal(got, np.clip(np.rint(p) + 60, 0, 255))
    got = zi.qmul(a, 0.5, 40, b, 0.5, 0, 1.0, 60, rounding="dyadic", dyadic_rounding="half_up")
    np.testing.assert_array_equal(got, np.clip(np.floor(p + 0.5) + 60, 0, 255))
    got = zi.qmul(a, 0.5, 40, b, 0.5, 0, 1.0, 60, rounding="gemmlowp")  # ties away from zero
    np.testing.assert_array_equal(got, np.clip(np.sign(p) * np.floor(np.abs(p) + 0.5) + 60, 0, 255))
    np.testing.assert_array_equal(got, ref_qmul(a, 0.5, 40, b, 0.5, 0, 1.0, 60, "gemmlowp"))


def test_qmul_bad_args():
    a = np.zeros((2, 3), np.uint8)
    with pytest.raises(ValueError, match="broadcast"):
        zi.qmul(a, 0.1, 0, np.zeros((3, 2), np.uint8), 0.1, 0, 0.1, 0)
    with pytest.raises(TypeError, match="b"):
        zi.qmul(a, 0.1, 0, a.astype(np.int32), 0.1, 0, 0.1, 0)
    with pytest.raises(ValueError, match="b_scale"):
        zi.qmul(a, 0.1, 0, a, float("nan"), 0, 0.1, 0)


class SENet(nn.Module):
    """MobileNetV3-style squeeze-excite: spatial mean -> 1x1 conv -> ReLU -> 1x1 conv ->
    Hardsigmoid -> x * gate (broadcast over H, W)."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize()
        self.c1 = _conv(1, WIDTH, 2)
        self.act = nn.Hardswish()
        self.squeeze = nn.Conv2d(WIDTH, WIDTH // 2, 1)
        self.excite = nn.Conv2d(WIDTH // 2, WIDTH, 1)
        self.gate = nn.Hardsigmoid()
        self.fc = nn.Linear(WIDTH, 10)

    def forward(self, x):
        x = self.act(self.c1(self.normalize(x)))
        s = self.gate(self.excite(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        x = x * s
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_squeeze_excite_end_to_end(tmp_path):
    torch.manual_seed(0)
    q = quantize(SENet())
    im = check_all(q, tmp_path, {"mul", "lookup"})
    mul = next(s for s in im.steps if isinstance(s, S.MulStep))
    env = im.run(images(4))
    assert env[mul.inputs[1]].shape == (4, WIDTH, 1, 1)  # the gate broadcasts over H, W
