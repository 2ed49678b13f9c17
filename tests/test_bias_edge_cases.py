"""int32 bias edge cases (pyzeroq.bias): overflowing and degenerate channels, in fake quantization,
the integer model and onnxruntime; the bias_overflow option; QuantizedModel's training flag."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pyzeroq as zq
from pyzeroq import ops
from pyzeroq.bias import BiasOverflowWarning, fit_weight_scale
from pyzeroq.models import Normalize, load_pretrained
from pyzeroq.modules import layer_records, quant_layers
from pyzeroq.qspec import INT32_MAX, TensorQuant, quantize_bias

FAST = dict(weight_bits=8, act_bits=8, calibration="gaussian", num_samples=8, progress=False)
SHAPE = (1, 8, 8)
OVERFLOW_BIAS, ZERO_BIAS, TINY_BIAS, LOGIT_BIAS = 5.0, 0.3137, 0.2, 0.7
TINY_WEIGHT = 1e-9     # conv1 channel 0: +-1e-9 weights, bias 5.0 (the overflow case)
SUBNORMAL_WEIGHT = 1e-42  # conv2 channel 2: a range that underflows the bias step
CONSTANT_WEIGHT = 0.5  # conv1 channel 3: one nonzero constant (not degenerate)
HALF_CODE = 0.5 + 2.0 ** -8  # rounding of the output plus the bias error allowed by OUTPUT_CODE_FRACTION
LOGIT_RTOL = 2.0 ** -20


class EdgeNet(nn.Module):
    """conv1: [+-1e-9 / bias 5.0, zeros / bias 0.3137, normal x4, constant 0.5 / bias 0.1];
    conv2 (1x1, wide input range): [zeros / bias 0.3137, small normal, 1e-42 / bias 0.2];
    fc (logits): [zeros / bias 0.7, normal]."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 3, 1)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            w1 = torch.randn(4, 1, 3, 3, generator=g)
            w1[0] = torch.where(torch.arange(9).view(1, 3, 3) % 2 == 0, TINY_WEIGHT, -TINY_WEIGHT)
            w1[1] = 0.0
            w1[2] *= 4.0  # a wide conv1 output range: conv2's input step is coarse (~0.09)
            w1[3] = CONSTANT_WEIGHT
            self.conv1.weight.copy_(w1)
            self.conv1.bias.copy_(torch.tensor([OVERFLOW_BIAS, ZERO_BIAS, 0.0, 0.1]))
            w2 = torch.randn(3, 4, 1, 1, generator=g) * 0.02  # a narrow conv2 output range
            w2[0] = 0.0
            w2[2] = SUBNORMAL_WEIGHT
            self.conv2.weight.copy_(w2)
            self.conv2.bias.copy_(torch.tensor([ZERO_BIAS, 0.05, TINY_BIAS]))
            self.fc.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5]]))
            self.fc.bias.copy_(torch.tensor([LOGIT_BIAS, 0.1]))

    def forward(self, x):
        y = self.relu1(self.conv1(self.normalize(x)))
        z = self.relu2(self.conv2(y))
        return self.fc(torch.flatten(self.gap(z), 1))


def images(n: int = 8) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(1))


def quantize(model=None, **cfg):
    torch.set_num_threads(1)
    model = EdgeNet().eval() if model is None else model
    return zq.quantize(model, zq.QuantConfig(**{**FAST, **cfg}), input_shape=SHAPE)


def layer_outputs(qmodel, x) -> dict:
    """{layer: (output record, fake-quant output after its quantizer)} and the logits."""
    out, hooks = {}, []
    for name, layer in quant_layers(qmodel.graph_module).items():
        if layer.output_quant is not None:
            hooks.append(layer.output_quant.register_forward_hook(
                lambda m, i, o, name=name: out.__setitem__(name, o.detach().numpy())))
    with torch.no_grad():
        logits = qmodel(x).numpy()
    for h in hooks:
        h.remove()
    return out, logits


def worst_accumulation(w_q: TensorQuant, w: np.ndarray, in_q: TensorQuant, c: int = 0) -> int:
    """Largest positive sum of (x - z_x)(w - z_w) any input codes give channel c (numpy reference)."""
    _, w_zp = w_q.channels(w.shape[0])
    rel = w_q.quantize(w)[c].reshape(-1).astype(np.int64) - int(w_zp[c])
    z_x = in_q.zero_point_value
    return int(np.where(rel > 0, rel, 0).sum() * (in_q.qmax - z_x) + np.where(rel < 0, -rel, 0).sum() * z_x)


@pytest.fixture(scope="module")
def edge():
    return quantize()


@pytest.fixture(scope="module")
def float_outputs():
    model, x = EdgeNet().eval(), images()
    with torch.no_grad():
        y1 = model.relu1(model.conv1(model.normalize(x)))
        y2 = model.relu2(model.conv2(y1))
        return {"conv1": y1.numpy(), "conv2": y2.numpy()}, model(x).numpy()


# ---------------------------------------------------------------- fake quantization
def test_edge_channels_fake_quant_match_float(edge, float_outputs):
    (want, want_logits), (got, logits) = float_outputs, layer_outputs(edge, images())
    for name, channels in {"conv1": [0, 1], "conv2": [0, 2]}.items():
        step = float(quant_layers(edge.graph_module)[name].output_quant.scale)
        for c in channels:
            err = np.abs(got[name][:, c] - want[name][:, c]).max()
            assert err <= HALF_CODE * step, (name, c, err / step)
    assert np.allclose(got["conv1"][:, 0], OVERFLOW_BIAS, atol=HALF_CODE * float(edge.graph_module.conv1.output_quant.scale))
    np.testing.assert_allclose(logits[:, 0], want_logits[:, 0], rtol=LOGIT_RTOL)  # zero weights: the bias 0.7


def test_constant_channel_is_exact_and_untouched(edge):
    rec = layer_records(edge.graph_module)["conv1"]
    w = ops.dequantize(rec.weight_codes.reshape(4, -1), *rec.weight.channels(4), axis=0)[3]
    np.testing.assert_allclose(w, CONSTANT_WEIGHT, rtol=np.finfo(np.float32).eps)
    assert not [a for a in edge.report.bias_adjustments if (a["layer"], a["channel"]) == ("conv1", 3)]


def test_report_lists_every_adjustment(edge):
    got = {(a["layer"], a["channel"]): a for a in edge.report.bias_adjustments}
    assert set(got) == {("conv1", 0), ("conv1", 1), ("conv2", 0), ("conv2", 2), ("fc", 0)}
    assert got["conv1", 0]["reason"] == "int32 bias overflow" and got["conv1", 0]["action"] == "weight scale enlarged"
    assert got["conv1", 0]["new_scale"] > got["conv1", 0]["old_scale"]
    assert got["conv1", 0]["new_zero_point"] == got["conv1", 0]["old_zero_point"]  # range only widens
    for key in [("conv1", 1), ("conv2", 0), ("fc", 0)]:
        assert got[key]["reason"] == "zero weights" and got[key]["old_scale"] == 1.0 > got[key]["new_scale"]
    assert got["conv2", 2]["reason"].startswith("weight scale underflow")
    assert got["conv1", 0]["bias"] == OVERFLOW_BIAS and got["fc", 0]["bias"] == pytest.approx(LOGIT_BIAS)


def test_enlarged_scale_is_just_enough(edge):
    rec = layer_records(edge.graph_module)["conv1"]
    s_in, s_w = np.float32(rec.input.scale_value), rec.weight.scale[0]
    w = edge.graph_module.conv1.weight.detach().numpy().reshape(4, -1)
    assert 0 < rec.bias[0] <= INT32_MAX - worst_accumulation(rec.weight, w, rec.input)  # room for the accumulation
    smaller = np.nextafter(s_w, np.float32(0))  # one ulp less does not fit
    w_q = TensorQuant(8, np.where(np.arange(4) == 0, smaller, rec.weight.scale), rec.weight.zero_point, axis=0)
    code = int(np.rint(np.float32(OVERFLOW_BIAS) / np.float32(s_in * smaller)))
    assert code > INT32_MAX - worst_accumulation(w_q, w, rec.input)
    exact = float(rec.bias[0]) * float(rec.bias_scale[0])
    assert abs(exact - OVERFLOW_BIAS) <= float(np.spacing(np.float32(OVERFLOW_BIAS)))  # float32 b / step: exact to 1 ulp


# ---------------------------------------------------------------- integer model and onnxruntime
def test_integer_model_agrees(edge):
    x = images()
    im = zq.to_integer(edge)
    env = im.run(x.numpy())
    got, logits = layer_outputs(edge, x)
    records = layer_records(edge.graph_module)
    for name in ("conv1", "conv2"):
        out = records[name].output
        codes = env[name].astype(np.int64)
        fq = np.rint(got[name] / np.float32(out.scale_value)).astype(np.int64) + out.zero_point_value
        np.testing.assert_array_equal(codes, fq, err_msg=name)
    real = records["conv1"].output.dequantize(env["conv1"])
    np.testing.assert_allclose(real[:, 0], OVERFLOW_BIAS, atol=HALF_CODE * records["conv1"].output.scale_value)
    np.testing.assert_allclose(im(x.numpy())[:, 0], LOGIT_BIAS, rtol=LOGIT_RTOL)
    np.testing.assert_allclose(im(x.numpy()), logits, rtol=1e-5, atol=1e-6)
    report = im.report()
    assert all(r["bound_bits"] <= 32 and r["overflows"] == 0 for r in report.layers), report.to_markdown()


def test_onnxruntime_equals_integer_model(edge, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from pyzeroq.export import build_onnx

    x = images().numpy()
    im = zq.to_integer(edge)
    env = im.run(x)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    model = build_onnx(im, x[:1], intermediate=True)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))
    for name, value in outs.items():
        np.testing.assert_array_equal(value, env[im.output] if name == "logits" else env[name], err_msg=name)
    exported = zq.export_onnx(edge, tmp_path / "edge.onnx", x[:1])
    sess = ort.InferenceSession(exported.SerializeToString(), so, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"input": x})[0], im(x))
    np.testing.assert_allclose(outs["logits"][:, 0], LOGIT_BIAS, rtol=LOGIT_RTOL)


# ---------------------------------------------------------------- the option
def test_error_option_names_layer_and_channel():
    with pytest.raises(ValueError, match=r"layer 'conv1' channel 0: the int32 bias overflows.*bias_overflow"):
        quantize(bias_overflow="error")


def test_clip_option_warns_and_keeps_old_behaviour():
    with pytest.warns(BiasOverflowWarning, match="conv1.*channel 0"):
        q = quantize(bias_overflow="clip")
    clipped = [a for a in q.report.bias_adjustments if a["action"] == "clipped"]
    assert [(a["layer"], a["channel"]) for a in clipped] == [("conv1", 0)]
    assert clipped[0]["new_scale"] == clipped[0]["old_scale"]
    got, _ = layer_outputs(q, images())
    assert np.abs(got["conv1"][:, 0]).max() < 0.1  # the saturated bias: the channel is ~0.0, not 5.0


def test_config_validates_bias_overflow():
    with pytest.raises(ValueError, match="bias_overflow"):
        zq.QuantConfig(bias_overflow="saturate")


def test_per_tensor_weights_enlarge_the_single_scale():
    model = nn.Sequential(Normalize(), nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.where(torch.arange(18).view(2, 1, 3, 3) % 2 == 0, TINY_WEIGHT, -TINY_WEIGHT))
        model[1].bias.copy_(torch.tensor([OVERFLOW_BIAS, 2.0]))
    q = quantize(model.eval(), per_channel=False)
    [adj] = [a for a in q.report.bias_adjustments if a["layer"] == "1"]
    assert adj["channel"] is None and adj["reason"] == "int32 bias overflow" and adj["bias"] == OVERFLOW_BIAS
    rec = layer_records(q.graph_module)["1"]
    assert not rec.weight.per_channel and float(rec.weight.scale) == adj["new_scale"]
    got, _ = layer_outputs(q, images())
    step = rec.output.scale_value
    np.testing.assert_allclose(got["1"][:, 0], OVERFLOW_BIAS, atol=HALF_CODE * step)
    np.testing.assert_allclose(got["1"][:, 1], 2.0, atol=HALF_CODE * step)


# ---------------------------------------------------------------- fit_weight_scale on records
def _records(scale, zp, bits=8, in_scale=0.05, in_zp=0, out_scale=0.02):
    w_q = TensorQuant(bits, np.asarray(scale, np.float32), np.asarray(zp, np.int32), axis=0)
    return w_q, TensorQuant(8, np.float32(in_scale), np.int32(in_zp)), TensorQuant(8, np.float32(out_scale), np.int32(0))


def test_fit_keeps_ordinary_and_zero_bias_channels():
    w = np.array([[0.5, -0.25, 0.1], [0.0, 0.0, 0.0]], np.float32)
    scale, zp = ops.asymmetric_params(w, 8, axis=0)
    w_q, in_q, out_q = _records(scale, zp)
    fitted, adjustments = fit_weight_scale("l", w, np.array([0.3, 0.0]), w_q, in_q, out_q)
    assert fitted is w_q and adjustments == []


def test_fit_reserves_accumulation_headroom():
    """A bias code that fits int32 but not int32 plus the worst accumulation is enlarged too."""
    w = np.full((1, 64), 0.01, np.float32)
    w[0, ::2] = -0.01
    scale, zp = ops.asymmetric_params(w, 8, axis=0)
    w_q, in_q, out_q = _records(scale, zp, in_zp=128)
    step = float(np.float32(np.float32(0.05) * scale[0]))
    bias = np.array([(INT32_MAX - 1000) * step], np.float32)  # code ~INT32_MAX - 1000: fits int32 alone
    assert quantize_bias(bias, in_q, w_q)[0] < INT32_MAX
    fitted, [adj] = fit_weight_scale("l", w, bias, w_q, in_q, out_q)
    assert adj["reason"] == "int32 bias overflow" and fitted.scale[0] > scale[0]
    assert int(quantize_bias(bias, in_q, fitted)[0]) + worst_accumulation(fitted, w, in_q) <= INT32_MAX
    smaller = np.nextafter(fitted.scale, np.float32(0))
    w_less = TensorQuant(8, smaller, fitted.zero_point, axis=0)
    assert int(quantize_bias(bias, in_q, w_less)[0]) + worst_accumulation(w_less, w, in_q) > INT32_MAX


def test_fit_rejects_unknown_mode_and_non_finite_bias():
    w = np.zeros((1, 3), np.float32)
    w_q, in_q, out_q = _records([1.0], [0])
    with pytest.raises(ValueError, match="on_overflow"):
        fit_weight_scale("l", w, None, w_q, in_q, out_q, on_overflow="wrap")
    with pytest.raises(ValueError, match="layer 'l'.*NaN"):
        fit_weight_scale("l", w, np.array([np.nan]), w_q, in_q, out_q)


# ---------------------------------------------------------------- no-op on a real model; training flag
def test_resnet20_unchanged():
    with warnings.catch_warnings():
        warnings.simplefilter("error", BiasOverflowWarning)
        torch.manual_seed(0)
        fitted = zq.quantize(load_pretrained("resnet20"), zq.QuantConfig(**FAST), input_shape=(1, 28, 28))
        clipped = zq.quantize(load_pretrained("resnet20"), zq.QuantConfig(**FAST, bias_overflow="clip"),
                              input_shape=(1, 28, 28))
    assert fitted.report.bias_adjustments == [] and clipped.report.bias_adjustments == []
    for name, layer in quant_layers(fitted.graph_module).items():  # the scales asymmetric_params gives
        scale, zp = ops.asymmetric_params(layer.weight.detach().reshape(layer.weight.shape[0], -1).numpy(), 8, axis=0)
        assert np.array_equal(layer.weight_quant.scale.numpy(), scale) and np.array_equal(
            layer.weight_quant.zero_point.numpy(), zp.astype(np.int64)), name
    assert layer_records(fitted.graph_module) == layer_records(clipped.graph_module)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(fitted(x), clipped(x))


def test_training_flag_follows_the_graph(edge):
    assert not edge.training and not any(m.training for m in edge.modules())
    x = images(2)
    with torch.no_grad():
        before = edge(x)
        edge.train()
        assert all(m.training for m in edge.modules())
        during = edge(x)  # no Dropout here: the same fake quantization
        edge.eval()
    assert not any(m.training for m in edge.modules())
    assert torch.equal(before, during)
