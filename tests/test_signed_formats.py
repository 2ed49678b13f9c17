"""Signed codes and symmetric weights through the pipeline (QuantConfig weight_scheme / act_dtype /
act_scheme / target): the records each format produces, the fake-quant model, ``to_integer``,
``integer_exact`` and onnxruntime on the QOperator export, save / load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_zoo import FAST, check_integer_paths, inputs
from zoo import ZOO, build

import pyzeroq as zq
from pyzeroq.config import TARGETS
from pyzeroq.qspec import CodeFormat

INT8_MIN, INT8_MAX = -128, 127


def layer_records(q) -> list:
    return [m.layer_record(n) for n, m in q.graph_module.named_modules() if hasattr(m, "layer_record")]


def act_records(q) -> list:
    return [m.record() for m in q.graph_module.modules() if type(m).__name__ == "QuantAct" and m.mode == "quantize"]


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_target_presets(target):
    cfg = zq.QuantConfig(target=target)
    assert (cfg.weight_scheme, cfg.act_dtype, cfg.act_scheme) == tuple(TARGETS[target][k] for k in
                                                                      ("weight_scheme", "act_dtype", "act_scheme"))
    assert cfg.weight_format == CodeFormat(signed=True, narrow_range=True, symmetric=True)
    assert cfg.act_format.signed
    same = zq.QuantConfig(target=target, weight_scheme="symmetric")  # agreeing explicit value
    assert same == cfg


def test_default_format_is_unsigned_asymmetric():
    cfg = zq.QuantConfig()
    assert (cfg.weight_scheme, cfg.act_dtype, cfg.act_scheme, cfg.target) == ("asymmetric", "uint8", "asymmetric", None)
    assert cfg.weight_format == cfg.act_format == CodeFormat()


@pytest.mark.parametrize("kwargs, field", [
    (dict(target="tflite", weight_scheme="asymmetric"), "weight_scheme"),
    (dict(target="tensorrt", act_scheme="asymmetric"), "act_scheme"),
    (dict(target="onnxruntime", act_dtype="uint8"), "act_dtype"),
    (dict(target="openvino"), "target"),
    (dict(weight_scheme="sym"), "weight_scheme"),
    (dict(act_dtype="int4"), "act_dtype"),
    (dict(act_scheme=1), "act_scheme"),
])
def test_bad_format_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        zq.QuantConfig(**kwargs)


# ---------------------------------------------------------------------------- records
def quantized(name: str, **settings):
    shape = ZOO[name][1]
    return zq.quantize(build(name), zq.QuantConfig(**{**FAST, **settings}), input_shape=shape), shape


@pytest.mark.parametrize("bits", [8, 4])
def test_symmetric_weight_records(bits):
    """Symmetric weights: signed narrow-range codes, zero point 0, scale max|w| / (2^(b-1) - 1) per
    channel (the bias fit may only enlarge it), codes = rne(w / scale)."""
    q, _ = quantized("resnet18", weight_bits=bits, act_bits=8, target="tflite")
    qmax = (1 << (bits - 1)) - 1
    for rec in layer_records(q):
        w = rec.weight
        assert w.signed and w.narrow_range and (w.zero_point == 0).all()
        assert rec.weight_codes.dtype == np.int8
        assert rec.weight_codes.min() >= -qmax and rec.weight_codes.max() <= qmax
        float_w = q.graph_module.get_submodule(rec.name).weight.detach().numpy().reshape(len(w.scale), -1)
        amax = np.abs(float_w).max(1)
        expected = np.where(amax > 0, (amax / qmax).astype(np.float32), np.float32(1.0))
        assert (w.scale >= expected).all()
        assert np.mean(w.scale == expected) > 0.9
        assert rec.input.signed and rec.input.code_dtype == np.int8


def test_int8_asymmetric_activations_equal_uint8():
    """Asymmetric int8 activations are the uint8 ones with every zero point less 128: the same scales,
    the same fake-quant outputs bit for bit, and integer outputs equal to the uint8 model's."""
    q_u, shape = quantized("mobilenetv2", weight_bits=8, act_bits=8)
    q_s, _ = quantized("mobilenetv2", weight_bits=8, act_bits=8, act_dtype="int8")
    for ru, rs in zip(act_records(q_u), act_records(q_s)):
        assert rs.signed and not ru.signed
        assert rs.scale_value == ru.scale_value and rs.zero_point_value == ru.zero_point_value - 128
    x = inputs(shape)
    with torch.no_grad():
        torch.testing.assert_close(q_s(x), q_u(x), rtol=0, atol=0)
    im_u, im_s = zq.to_integer(q_u), zq.to_integer(q_s)
    np.testing.assert_array_equal(im_s(x.numpy()), im_u(x.numpy()))
    env_u, env_s = im_u.run(x.numpy()), im_s.run(x.numpy())
    codes = [k for k, v in env_s.items() if v.dtype == np.int8]
    assert codes, "the signed model carries no int8 codes"
    for k in codes:
        np.testing.assert_array_equal(env_s[k].astype(np.int32) + 128, env_u[k].astype(np.int32))


def test_tensorrt_symmetric_activations():
    q, shape = quantized("resnet18", weight_bits=8, act_bits=8, target="tensorrt")
    recs = act_records(q)
    assert recs and all(r.signed and r.zero_point_value == 0 for r in recs)
    env = zq.to_integer(q).run(inputs(shape).numpy())
    relu_out = [v for v in env.values() if v.dtype == np.int8 and v.min() >= 0]
    assert relu_out, "ReLU outputs of a symmetric format use the codes [0, 127]"


# ---------------------------------------------------------------------------- integer paths
U8S8 = dict(weight_scheme="symmetric")  # uint8 activations, symmetric int8 weights (fbgemm, onnxruntime U8S8)
SIGNED_CASES = [(name, dict(target="tflite"), 8) for name in sorted(ZOO)] + \
    [(name, dict(target="tensorrt"), 4) for name in ("resnet18", "mobilenetv3_small", "unet")] + \
    [(name, dict(target="onnxruntime"), 4) for name in ("densenet", "shufflenetv2", "efficientnet_b0")] + \
    [(name, U8S8, 8) for name in ("resnet50", "inception", "fcos")]


@pytest.mark.parametrize("name, fmt, weight_bits", SIGNED_CASES, ids=lambda v: "-".join(map(str, v.values()))
                         if isinstance(v, dict) else str(v))
def test_signed_zoo_integer_paths(name, fmt, weight_bits, tmp_path):
    """The zoo's checks (tests/test_zoo.py) with signed codes: to_integer near the fake-quant model,
    integer_exact equal to it, onnxruntime's S8S8 (U8S8) QOperator graph equal bit for bit."""
    q, shape = quantized(name, weight_bits=weight_bits, act_bits=8, **fmt)
    assert q.report.float_ops == []
    check_integer_paths(q, inputs(shape), tmp_path / f"{name}.onnx")
    onnx = pytest.importorskip("onnx")
    model = onnx.load(tmp_path / f"{name}.onnx")
    inits = {i.name: i.data_type for i in model.graph.initializer}
    ones_convs = ("_pool_", "_requant")  # all-ones requantization convs take the activation's type
    weight_zps = [v for k, v in inits.items() if k.endswith("_w_zero_point") and not any(o in k for o in ones_convs)]
    act_zps = [v for k, v in inits.items() if k.endswith("_x_zero_point")]
    act_type = onnx.TensorProto.INT8 if q.config.act_dtype == "int8" else onnx.TensorProto.UINT8
    assert weight_zps and set(weight_zps) == {onnx.TensorProto.INT8}
    assert act_zps and set(act_zps) == {act_type}


def test_uint8_pixels_with_int8_codes():
    """The uint8-pixel input table yields the same int8 codes as the float path on p / 255."""
    q, shape = quantized("resnet18", weight_bits=8, act_bits=8, target="tflite")
    im = zq.to_integer(q)
    pixels = (inputs(shape) * 255).round().to(torch.uint8)
    assert im.input_lut.dtype == np.int8
    np.testing.assert_array_equal(im(pixels.numpy()), im((pixels.float() / 255).numpy()))


def test_signed_save_load_round_trip(tmp_path):
    q, shape = quantized("mobilenetv3_small", weight_bits=4, act_bits=8, target="tensorrt")
    q.save(tmp_path / "m.pzq")
    back = zq.load(tmp_path / "m.pzq")
    assert back.config == q.config
    assert [r for r in layer_records(back)] == layer_records(q)
    x = inputs(shape)
    with torch.no_grad():
        torch.testing.assert_close(back(x), q(x), rtol=0, atol=0)
    np.testing.assert_array_equal(zq.to_integer(back)(x.numpy()), zq.to_integer(q)(x.numpy()))


def test_signed_bias_overflow_enlarges_scale():
    """The int32-bias fit (issue 16's case: tiny weights, bias 5.0) keeps symmetric weights symmetric."""
    conv = torch.nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1e-9, -1e-9]).view(2, 1, 1, 1))
        conv.bias.copy_(torch.tensor([5.0, 0.5]))
    model = torch.nn.Sequential(conv, torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3))
    q = zq.quantize(model, zq.QuantConfig(calibration="gaussian", num_samples=4, progress=False, target="tflite"),
                    input_shape=(1, 4, 4))
    rec = layer_records(q)[0]
    assert rec.weight.signed and (rec.weight.zero_point == 0).all()
    assert any(a["layer"] == rec.name for a in q.report.bias_adjustments)
    x = torch.rand(2, 1, 4, 4)
    with torch.no_grad():
        out = q.graph_module.get_submodule(rec.name)(x)
    assert abs(float(out[:, 0].mean()) - 5.0) < 0.1
