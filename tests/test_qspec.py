"""Quantization records (pyzeroq.qspec): validation, exact equality, the bias formula
against a plain-loop reference (constructed ties included), and that the records a
calibrated model produces are what its fake-quant forward computes."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_models import trained_tiny

import pyzeroq as zq
from pyzeroq import ops
from pyzeroq.modules import layer_records, prepare, quant_layers, set_act_mode, set_weight_bits
from pyzeroq.qspec import INT32_MAX, INT32_MIN, LayerQuant, TensorQuant, quantize_bias


def tq(bits=8, scale=0.1, zp=3, axis=None, **kw):
    return TensorQuant(bits, np.asarray(scale, np.float32), np.asarray(zp), axis, **kw)


@pytest.mark.parametrize("kwargs, field", [
    (dict(bits=1), "bits"), (dict(bits=17), "bits"), (dict(bits=True), "bits"),
    (dict(scale=0.0), "scale"), (dict(scale=float("nan")), "scale"), (dict(scale=-1.0), "scale"),
    (dict(zp=256), "zero_point"), (dict(zp=-1), "zero_point"), (dict(zp=2.5), "zero_point"),
    (dict(scale=[0.1, 0.2], zp=[1, 2]), "axis"), (dict(scale=[0.1, 0.2], zp=1, axis=0), "zero_point"),
    (dict(scale=0.1, zp=1, axis=0), "axis"),
    (dict(scale=[0.1, 0.2], zp=[1, 2], axis=1.0), "axis"), (dict(scale=[0.1, 0.2], zp=[1, 2], axis=True), "axis"),
])
def test_tensor_quant_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        tq(**kwargs)


def test_tensor_quant_from_dict_names_missing_keys():
    with pytest.raises(ValueError, match=r"missing \['scale', 'zero_point', 'axis'\]"):
        TensorQuant.from_dict({"bits": 8})
    rec = tq(scale=[0.1, 0.2], zp=[1, 2], axis=np.int64(1))
    assert rec.axis == 1 and type(rec.axis) is int and TensorQuant.from_dict(rec.to_dict()) == rec


def test_code_ranges_signed_and_narrow():
    assert (tq(8).qmin, tq(8).qmax) == (0, 255)
    assert (tq(8, zp=0, signed=True).qmin, tq(8, zp=0, signed=True).qmax) == (-128, 127)
    assert tq(8, zp=0, signed=True, narrow_range=True).qmin == -127
    assert (tq(4, zp=1, narrow_range=True).qmin, tq(4, zp=1).qmax) == (1, 15)
    x = np.array([-200.0, -1.26, 0.5, 1.5, 200.0], np.float32)
    signed = tq(8, scale=1.0, zp=0, signed=True, narrow_range=True)
    q = signed.quantize(x)
    assert q.dtype == np.int8 and q.tolist() == [-127, -1, 0, 2, 127]
    assert signed.fake_quantize(x).tolist() == [-127.0, -1.0, 0.0, 2.0, 127.0]
    assert signed.dequantize(q).tolist() == [-127.0, -1.0, 0.0, 2.0, 127.0]
    assert tq(4, scale=1.0, zp=1, narrow_range=True).quantize(x).tolist() == [1, 1, 1, 3, 15]


def test_records_are_frozen_and_compare_bit_exactly():
    a, b = tq(scale=0.1), tq(scale=0.1)
    assert a == b and hash(a) == hash(b)
    assert a != tq(scale=np.nextafter(np.float32(0.1), np.float32(1)))
    assert a != tq(zp=4) and a != tq(bits=7)
    with pytest.raises(Exception):
        a.bits = 4
    with pytest.raises(ValueError):
        a.scale[()] = 1.0  # read-only array
    pc = tq(4, [0.1, 0.2], [1, 2], axis=0)
    assert TensorQuant.from_dict(pc.to_dict()) == pc
    np.testing.assert_array_equal(pc.channels(2)[0], np.float32([0.1, 0.2]))
    np.testing.assert_array_equal(a.channels(3)[1], np.int32([3, 3, 3]))


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 8), st.floats(1e-4, 10), st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_quantize_is_ops_quantize(bits, scale, zp, seed):
    x = np.random.default_rng(seed).normal(0, 3, 64).astype(np.float32)
    r = tq(bits, scale, zp % (1 << bits))
    np.testing.assert_array_equal(r.quantize(x), ops.quantize(x, np.float32(scale), zp % (1 << bits), bits))
    np.testing.assert_array_equal(r.fake_quantize(x), r.dequantize(r.quantize(x)))


def bias_reference(bias, s_in, w_scales):
    """Plain loop: rne(b / f32(s_in * s_w[c])), float32 division, clamped to int32."""
    out = []
    for b, sw in zip(bias, w_scales):
        step = np.float32(np.float32(s_in) * np.float32(sw))
        v = float(np.float32(np.float32(b) / step))
        r = round(v)  # Python rounds half to even
        out.append(min(max(r, INT32_MIN), INT32_MAX))
    return np.array(out, np.int64)


def test_bias_quantization_matches_loop_reference_with_ties():
    s_in, w = np.float32(0.5), np.float32([0.25, 0.5, 1.0, 2.0, 1e-9, 1e-9])
    # exact halves (ties to even: 2.5 -> 2, 3.5 -> 4, -0.5 -> 0), and int32 saturation
    bias = np.float32([0.3125, 0.875, -0.25, 2.5, 5.0, -5.0])
    in_q = tq(8, s_in, 0)
    w_q = tq(8, w, np.zeros(6, np.int64), axis=0)
    codes = quantize_bias(bias, in_q, w_q)
    np.testing.assert_array_equal(codes, bias_reference(bias, s_in, w))
    assert codes.dtype == np.int32 and codes[4] == INT32_MAX and codes[5] == INT32_MIN
    assert list(codes[:4]) == [2, 4, 0, 2]


def test_layer_quant_validation():
    w = tq(8, [0.1, 0.2], [1, 2], axis=0)
    codes = np.zeros((2, 3), np.uint8)
    with pytest.raises(ValueError, match="bias"):
        LayerQuant("fc", w, codes, tq(), tq(), np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="per tensor"):
        LayerQuant("fc", w, codes, w)
    with pytest.raises(ValueError, match="activation"):
        LayerQuant("fc", w, codes, tq(), tq(), activation="gelu")
    rec = LayerQuant("fc", w, codes, tq(), tq(8, 6 / 255, 0), np.int32([5, -5]), "relu6")
    assert LayerQuant.from_dict(rec.to_dict()) == rec
    assert rec.clamp_codes() == (0, 255)
    assert LayerQuant("fc", w, codes, tq(), tq(8, 0.05, 10), None, "relu6").clamp_codes() == (10, 130)


@pytest.fixture(scope="module")
def calibrated():
    model = trained_tiny()
    cfg = zq.QuantConfig(weight_bits=4, act_bits=8, calibration="gaussian", num_samples=16, progress=False)
    return zq.quantize(model, cfg, input_shape=(1, 16, 16))


def test_records_are_what_the_forward_computes(calibrated):
    gm = calibrated.graph_module
    records = layer_records(gm)
    layers = quant_layers(gm)
    assert set(records) == set(layers) and records
    for name, rec in records.items():
        layer = layers[name]
        # weights: the forward's fake-quantized weight is exactly the dequantized record codes
        deq = rec.weight.dequantize(rec.weight_codes.reshape(rec.out_channels, -1)).reshape(layer.weight.shape)
        assert torch.equal(torch.as_tensor(deq), layer.quantized_weight())
        assert rec.weight.bits == calibrated.bit_widths[name] == 4
        assert rec.input == layer.input_quant.record()
        if rec.bias is not None:  # the forward's bias is exactly codes * bias_scale
            expect = torch.from_numpy(rec.bias.astype(np.float32) * rec.bias_scale)
            assert torch.equal(layer.quantized_bias().detach(), expect)
        if rec.output is not None:
            assert rec.output == layer.output_quant.record()
    # the records stay the same across calls (no hidden re-derivation)
    assert layer_records(gm) == records


def test_records_need_quantized_inputs(calibrated):
    import copy
    gm = copy.deepcopy(calibrated.graph_module)
    set_act_mode(gm, "off")
    with pytest.raises(ValueError, match="input is not quantized"):
        layer_records(gm)
    set_act_mode(gm, "quantize")
    set_weight_bits(gm, None)
    with pytest.raises(ValueError, match="float weights"):
        layer_records(gm)


def test_surgery_records_fused_activation():
    gm, _ = prepare(trained_tiny(steps=0))
    kinds = {n: (m.activation, m.output_quant is not None) for n, m in quant_layers(gm).items()}
    assert kinds == {"c1.0": ("relu", True), "c2.0": (None, True), "c3.0": ("relu6", True), "fc": (None, False)}


def test_records_pickle_with_canonical_dtypes():
    import pickle
    w = tq(4, [0.1, 0.2], [1, 2], axis=0)
    rec = LayerQuant("fc", w, np.arange(6, dtype=np.uint8).reshape(2, 3), tq(), None, np.int32([5, -5]))
    back = pickle.loads(pickle.dumps(rec))
    assert back == rec and back.weight_codes.dtype is np.dtype(np.uint8)
    assert pickle.loads(pickle.dumps(w)) == w
