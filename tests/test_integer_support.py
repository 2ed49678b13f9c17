"""quantize stops before any calibration on ops the integer path cannot run (pyzeroq.integer.support)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyzeroq as zq
from pyzeroq import pipeline

FAST = dict(num_samples=4, distill_iters=2, progress=False)


def _head(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3))


class Body(nn.Module):
    """conv -> BN -> ReLU -> ``op`` -> head; ``op``: a module or a function of the activation."""

    def __init__(self, op, conv=None, head=None):
        super().__init__()
        self.conv = conv or nn.Conv2d(1, 4, 3, padding=1)
        self.bn, self.relu, self.op = nn.BatchNorm2d(self.conv.out_channels), nn.ReLU(), op
        self.head = head or _head(self.conv.out_channels)

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        return self.head(self.op(y) if isinstance(self.op, nn.Module) else self.op(y))


def _add_mean(y):
    return y + y.mean((2, 3), keepdim=True)


def _avg_no_pad_count(y):
    return F.avg_pool2d(y, 3, 1, 1, count_include_pad=False)


CASES = {
    "maxpool dilation": (Body(nn.MaxPool2d(3, 1, 1, dilation=2)), "MaxPool2d with dilation"),
    "reflect padding": (Body(nn.Identity(), conv=nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")),
                        "padding_mode='reflect'"),
    "avgpool ceil_mode": (Body(nn.AvgPool2d(3, 2, ceil_mode=True)), "AvgPool2d with ceil_mode"),
    "functional avgpool": (Body(_avg_no_pad_count), "count_include_pad"),
    "adaptive pool not dividing": (Body(nn.AdaptiveAvgPool2d(3)), "must divide the input"),
    "broadcast add": (Body(_add_mean), "broadcasting"),
}


@pytest.mark.parametrize("case", CASES)
def test_quantize_stops_before_calibration(case, monkeypatch):
    model, reason = CASES[case]
    model.eval()
    monkeypatch.setattr(pipeline, "calibration_data", lambda *a, **k: pytest.fail("calibration ran"))
    with pytest.raises(ValueError, match="no integer-only form") as info:
        zq.quantize(model, zq.QuantConfig(calibration="gaussian", **FAST), input_shape=(1, 10, 10))
    assert reason in str(info.value)


def test_float_ops_warn_keeps_the_fake_quant_model_and_to_integer_names_the_op():
    model = Body(nn.MaxPool2d(3, 1, 1, dilation=2)).eval()
    with pytest.warns(pipeline.FloatOpsWarning, match="MaxPool2d with dilation"):
        q = zq.quantize(model, zq.QuantConfig(calibration="gaussian", float_ops="warn", **FAST), input_shape=(1, 10, 10))
    assert torch.isfinite(q(torch.rand(2, 1, 10, 10))).all()
    with pytest.raises(zq.integer.UnsupportedOperationError, match="MaxPool2d with dilation"):
        zq.to_integer(q)


def test_upsampling_of_1d_maps_is_refused_early():
    class Audio(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.up = nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.Upsample(scale_factor=2)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.up(torch.relu(self.bn(self.conv(x)))).mean(2))

    with pytest.raises(ValueError, match="nearest upsampling of a 3-D tensor"):
        zq.quantize(Audio().eval(), zq.QuantConfig(calibration="gaussian", **FAST), input_shape=(1, 16))


def test_supported_variants_still_pass():
    """The limits are exact: the supported forms of the same ops quantize and run as integers."""
    for op in (nn.MaxPool2d(3, 1, 1), nn.AvgPool2d(3, 1, 1), nn.AdaptiveAvgPool2d(5),
               lambda y: y + torch.relu(y)):
        q = zq.quantize(Body(op).eval(), zq.QuantConfig(calibration="gaussian", **FAST), input_shape=(1, 10, 10))
        assert q.report.float_ops == []
        zq.to_integer(q)(torch.rand(2, 1, 10, 10))


@pytest.mark.parametrize("spelling", ["y * 0.5", "0.5 * y", "torch.mul(y, 0.5)", "y * 2"])
def test_layer_times_a_python_number_is_folded(spelling):
    """``layer(x) * constant`` (README) with a literal, not only a buffer: folded into the layer, no float op."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 3)

        def forward(self, x):
            y = self.conv(x)
            y = eval(spelling, {"torch": torch, "y": y})  # noqa: S307 -- the spellings above, nothing else
            return self.fc(torch.relu(y).mean((2, 3)))

    model = Scaled().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 1, 10, 10)
    q = zq.quantize(model, zq.QuantConfig(calibration="gaussian", act_bits=None, weight_bits=8, **FAST),
                    input_shape=(1, 10, 10))
    assert q.report.float_ops == []
    torch.testing.assert_close(q(x), model(x), atol=0.05, rtol=0.05)
    q8 = zq.quantize(model, zq.QuantConfig(calibration="gaussian", **FAST), input_shape=(1, 10, 10))
    zq.to_integer(q8)(x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the fold works on a copy


def test_integer_pixels_are_refused_by_the_fake_quant_models():
    """q and integer_exact(q) take float images; uint8 pixels (which they would read as floats 0..255)
    are a TypeError there, while the integer model takes them: integer_exact(q)(px / 255) == to_integer(q)(px)."""
    q = zq.quantize(Body(nn.Identity()).eval(), zq.QuantConfig(calibration="gaussian", **FAST), input_shape=(1, 10, 10))
    exact = zq.integer.integer_exact(q)
    px = torch.randint(0, 256, (3, 1, 10, 10), dtype=torch.uint8)
    for model in (q, exact):
        with pytest.raises(TypeError, match="float images in \\[0, 1\\], got a torch.uint8 tensor"):
            model(px)
    torch.testing.assert_close(exact(px.float() / 255), zq.to_integer(q)(px), rtol=0, atol=0)


def test_normalizer_with_parameter_mean_and_std():
    """An input normalizer whose mean / std are nn.Parameters (not buffers) is one (fx's tracing proxies
    parameters: it was inlined into float sub / div ops and refused): quantize, integer model, save / load."""
    class ParamNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.mean = nn.Parameter(torch.tensor([0.4]).view(1, 1, 1, 1), requires_grad=False)
            self.std = nn.Parameter(torch.tensor([0.2]).view(1, 1, 1, 1), requires_grad=False)

        def forward(self, x):
            return (x - self.mean) / self.std

    model = nn.Sequential(ParamNorm(), nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(256, 3)).eval()
    q = zq.quantize(model, zq.QuantConfig(calibration="gaussian", **FAST), input_shape=(1, 10, 10))
    assert q.report.float_ops == []
    x = torch.rand(3, 1, 10, 10)
    torch.testing.assert_close(zq.to_integer(q)(x), q(x), atol=1e-3, rtol=0)
