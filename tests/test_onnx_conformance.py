"""ONNX backend node tests, run on pyzeroq.ops / pyzeroq.integer.

The cases are collected at test time from the installed ``onnx`` package: its
``onnx.backend.test.case.node`` modules for QuantizeLinear, DequantizeLinear, QLinearConv,
QLinearMatMul, ConvInteger and MatMulInteger call ``expect(node, inputs, outputs, name)`` when
executed; each module is executed afresh with ``expect`` replaced by a recorder (the package's
own list of cases is left alone). Each case is translated (attributes axis, block_size,
output_dtype, saturate, precision, pads / strides / dilations / group / auto_pad; packed int4 /
uint4 / int2 / uint2 unpacked to int8 / uint8) and compared exactly. Every integer case must
pass; float8 / float4 cases are skipped with the reason. One test per case name.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import pyzeroq.integer as zi
from pyzeroq import ops

OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")
CASE_MODULES = ("quantizelinear", "dequantizelinear", "qlinearconv", "qlinearmatmul", "convinteger", "matmulinteger")
# numpy / ml_dtypes dtype name -> (bits, signed) of integer codes
INTEGER_CODES = {"uint8": (8, False), "int8": (8, True), "uint16": (16, False), "int16": (16, True),
                 "uint4": (4, False), "int4": (4, True), "uint2": (2, False), "int2": (2, True)}
FLOAT_CODE_PREFIXES = ("float8", "float4")
UINT8_MAX_BITS = 8


@dataclass
class NodeCase:
    name: str
    node: Any  # onnx.NodeProto
    inputs: list
    outputs: list


def collect_cases() -> list[NodeCase]:
    """Every node case of the six operators that the installed onnx package defines."""
    try:
        pkg = importlib.import_module("onnx.backend.test.case.node")
    except ImportError:
        return []
    captured: list[NodeCase] = []
    original = pkg.expect
    pkg.expect = lambda node, inputs, outputs, name, **_: captured.append(NodeCase(name, node, list(inputs),
                                                                                    list(outputs)))
    try:
        for module in CASE_MODULES:
            spec = importlib.util.find_spec(f"{pkg.__name__}.{module}")
            if spec is not None:
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
    finally:
        pkg.expect = original
    return [c for c in captured if c.node.op_type in OPS]


CASES = collect_cases()


# ---------------------------------------------------------------- values
class FloatCodes(Exception):
    """A float8 / float4 tensor: not integer codes."""


def to_numpy(value) -> np.ndarray:
    """numpy array of an input / output (TensorProto -> numpy_helper.to_array)."""
    if value is None:
        return None
    if not isinstance(value, np.ndarray) and hasattr(value, "data_type"):
        from onnx import numpy_helper

        value = numpy_helper.to_array(value)
    return np.asarray(value)


def integer_codes(value) -> tuple[np.ndarray, int, bool]:
    """(codes in an int8 / uint8 / int16 / uint16 container, bits, signed); FloatCodes for float8/4."""
    arr = to_numpy(value)
    name = arr.dtype.name
    if name.startswith(FLOAT_CODE_PREFIXES):
        raise FloatCodes(f"{name} codes: float8 / float4 formats are not integer codes (pyzeroq quantizes to "
                         f"integers only)")
    if name not in INTEGER_CODES:
        raise TypeError(f"unexpected code dtype {name}")
    bits, signed = INTEGER_CODES[name]
    container = (np.int8 if bits <= UINT8_MAX_BITS else np.int16) if signed else \
        (np.uint8 if bits <= UINT8_MAX_BITS else np.uint16)
    return arr.astype(container), bits, signed


def attributes(node, allowed: dict) -> dict:
    """Node attributes with defaults; an attribute this translation does not know fails the case."""
    from onnx import helper

    got = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    unknown = set(got) - set(allowed)
    if unknown:
        raise NotImplementedError(f"{node.op_type}: attribute(s) {sorted(unknown)} not translated")
    return {**allowed, **got}


def scalar(value) -> float:
    return float(np.asarray(value, np.float32).reshape(-1)[0])


def expand_blocks(param: np.ndarray, shape: tuple, axis: int, block_size: int) -> np.ndarray:
    """Blocked quantization: parameter [.., ceil(D / B), ..] -> one value per element of ``shape``."""
    return np.repeat(param, block_size, axis=axis)[tuple(slice(0, d) for d in shape)]


def per_element_layout(x: np.ndarray, scale, zp, axis: int, block_size: int):
    """(x view, scale, zero point, axis) for pyzeroq.ops: per tensor, per axis, or blocked
    (parameters expanded to every element, x seen as [1, size] quantized per 'channel')."""
    scale, zp = np.asarray(scale, np.float32), np.asarray(zp, np.int64)
    if block_size:
        s = expand_blocks(scale, x.shape, axis, block_size).reshape(-1)
        z = np.broadcast_to(expand_blocks(zp, x.shape, axis, block_size) if zp.ndim else zp, x.shape).reshape(-1)
        return x.reshape(1, -1), s, z, 1
    if scale.size == 1 and zp.size == 1:
        return x, scale.reshape(()), zp.reshape(()), None
    return x, scale, zp, axis % x.ndim


# ---------------------------------------------------------------- QuantizeLinear / DequantizeLinear
def run_quantize_linear(case: NodeCase):
    from onnx import TensorProto

    at = attributes(case.node, {"axis": 1, "block_size": 0, "saturate": 1, "output_dtype": 0, "precision": 0})
    if at["precision"] not in (0, TensorProto.FLOAT):
        raise NotImplementedError(f"precision={at['precision']}")
    want, bits, signed = integer_codes(case.outputs[0])  # output_dtype (if set) is the output's type
    x, scale = to_numpy(case.inputs[0]), to_numpy(case.inputs[1])
    zp = integer_codes(case.inputs[2])[0] if len(case.inputs) > 2 and case.inputs[2] is not None else np.zeros((), int)
    xv, s, z, axis = per_element_layout(x.astype(np.float32), scale, zp, at["axis"], at["block_size"])
    got = ops.quantize(xv, s, z, bits, axis, signed=signed).reshape(x.shape)  # saturate: float8 only
    return got, want


def run_dequantize_linear(case: NodeCase):
    at = attributes(case.node, {"axis": 1, "block_size": 0, "output_dtype": 0})
    q, _, _ = integer_codes(case.inputs[0])
    want = to_numpy(case.outputs[0])
    if want.dtype != np.float32:
        raise NotImplementedError(f"{want.dtype} output")
    zp = integer_codes(case.inputs[2])[0] if len(case.inputs) > 2 and case.inputs[2] is not None else np.zeros((), int)
    qv, s, z, axis = per_element_layout(q, to_numpy(case.inputs[1]), zp, at["axis"], at["block_size"])
    return ops.dequantize(qv, s, z, axis).reshape(q.shape), want


# ---------------------------------------------------------------- convolutions
CONV_ATTRS = {"auto_pad": b"NOTSET", "dilations": None, "group": 1, "kernel_shape": None, "pads": None,
              "strides": None}


def conv_geometry(node, x_shape, w_shape) -> tuple[list, list, list, int]:
    """(strides, pads (top, left, bottom, right), dilations, group) of a 2-D ONNX conv node,
    auto_pad resolved as the ONNX spec says (SAME_UPPER puts the odd pad at the end)."""
    at = attributes(node, CONV_ATTRS)
    kernel = list(w_shape[2:])
    if at["kernel_shape"] is not None and list(at["kernel_shape"]) != kernel:
        raise ValueError(f"kernel_shape {at['kernel_shape']} != weight shape {kernel}")
    strides = list(at["strides"] or [1, 1])
    dil = list(at["dilations"] or [1, 1])
    auto_pad = at["auto_pad"].decode() if isinstance(at["auto_pad"], bytes) else at["auto_pad"]
    if auto_pad in ("NOTSET", ""):
        pads = list(at["pads"] or [0, 0, 0, 0])
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    else:
        total = [max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
                 for n, s, k, d in zip(x_shape[2:], strides, kernel, dil)]
        small = [t // 2 for t in total]
        begin = small if auto_pad == "SAME_UPPER" else [t - h for t, h in zip(total, small)]
        pads = begin + [t - b for t, b in zip(total, begin)]
    return strides, pads, dil, int(at["group"])


def as_2d_conv(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """1-D convs as 2-D ones with height 1; (x, w, was_1d)."""
    if x.ndim == 3:
        return x[:, :, None, :], w[:, :, None, :], True
    if x.ndim != 4:
        raise NotImplementedError(f"{x.ndim - 2}-D convolution")
    return x, w, False


def run_conv(case: NodeCase, requantized: bool):
    ins = list(case.inputs) + [None] * 9  # absent optional inputs read as None
    if requantized:  # QLinearConv: x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, [B]
        x, w = integer_codes(ins[0])[0], integer_codes(ins[3])[0]
        zx, zw, zy = integer_codes(ins[2])[0], integer_codes(ins[5])[0], integer_codes(ins[7])[0]
    else:  # ConvInteger: x, w, [x_zp], [w_zp]
        x, w = integer_codes(ins[0])[0], integer_codes(ins[1])[0]
        zx = integer_codes(ins[2])[0] if ins[2] is not None else np.zeros((), x.dtype)
        zw = integer_codes(ins[3])[0] if ins[3] is not None else np.zeros((), w.dtype)
    x4, w4, was_1d = as_2d_conv(x, w)
    strides, pads, dil, group = conv_geometry(case.node, x.shape, w.shape)
    if was_1d:
        strides, pads, dil = [1, strides[0]], [0, pads[0], 0, pads[1]], [1, dil[0]]
    zx, zw = zx.reshape(()), np.broadcast_to(zw.reshape(-1), (w.shape[0],))
    if requantized:
        bias = to_numpy(ins[8])
        got, _ = zi.qlinear_conv2d(x4, scalar(to_numpy(ins[1])), zx, w4, to_numpy(ins[4]).astype(np.float32),
                                   zw, scalar(to_numpy(ins[6])), zy.reshape(()), bias, strides, pads, dil, group)
    else:
        got, _ = zi.conv_integer(x4, zx, w4, zw, None, strides, pads, dil, group)
    return (got[:, :, 0, :] if was_1d else got), to_numpy(case.outputs[0])


# ---------------------------------------------------------------- matmuls
def batched_matmul(fn, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """numpy matmul broadcasting over the leading dims of a and b, fn(a_i [M, K], b_i [K, N])."""
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    ab = np.broadcast_to(a2, batch + a2.shape[-2:]).reshape((-1,) + a2.shape[-2:])
    bb = np.broadcast_to(b2, batch + b2.shape[-2:]).reshape((-1,) + b2.shape[-2:])
    out = np.stack([fn(ab[i], bb[i]) for i in range(ab.shape[0])]).reshape(batch + (a2.shape[-2], b2.shape[-1]))
    if a.ndim == 1:
        out = out[..., 0, :]
    return out[..., 0] if b.ndim == 1 else out


def run_qlinear_matmul(case: NodeCase):
    a, sa, za, b, sb, zb, sy, zy = case.inputs[:8]
    a, za, b, zb, zy = (integer_codes(v)[0] for v in (a, za, b, zb, zy))
    sb = to_numpy(sb).astype(np.float32).reshape(-1)
    fn = lambda ai, bi: zi.qlinear_matmul(ai, scalar(to_numpy(sa)), za.reshape(()), bi, sb, zb.reshape(-1),  # noqa: E731
                                          scalar(to_numpy(sy)), zy.reshape(()))[0]
    return batched_matmul(fn, a, b), to_numpy(case.outputs[0])


def run_matmul_integer(case: NodeCase):
    ins = list(case.inputs) + [None, None]
    a, b = integer_codes(ins[0])[0], integer_codes(ins[1])[0]
    za = integer_codes(ins[2])[0].reshape(-1) if ins[2] is not None else np.zeros(1, a.dtype)
    zb = integer_codes(ins[3])[0].reshape(-1) if ins[3] is not None else np.zeros(1, b.dtype)

    def one(ai, bi):  # a_zero_point may be per row (M values): one call per row then
        if za.size == 1:
            return zi.matmul_integer(ai, za[0], bi, zb)[0]
        return np.concatenate([zi.matmul_integer(ai[m:m + 1], za[m], bi, zb)[0] for m in range(ai.shape[0])])

    return batched_matmul(one, a, b), to_numpy(case.outputs[0])


RUNNERS = {
    "QuantizeLinear": run_quantize_linear,
    "DequantizeLinear": run_dequantize_linear,
    "QLinearConv": lambda case: run_conv(case, requantized=True),
    "ConvInteger": lambda case: run_conv(case, requantized=False),
    "QLinearMatMul": run_qlinear_matmul,
    "MatMulInteger": run_matmul_integer,
}


# ---------------------------------------------------------------- the tests
@pytest.mark.skipif(not CASES, reason="onnx (with its backend node test cases) is not installed")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_onnx_node_case(case: NodeCase):
    try:
        got, want = RUNNERS[case.node.op_type](case)
    except FloatCodes as reason:
        pytest.skip(str(reason))
    if want.dtype.name in INTEGER_CODES:  # integer outputs: values and signedness
        want, _, signed = integer_codes(want)
        assert (got.dtype.kind == "i") == signed, (got.dtype, want.dtype)
    else:
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.astype(np.int64) if got.dtype.kind in "iu" else got,
                                  want.astype(np.int64) if want.dtype.kind in "iu" else want)


def test_cases_were_collected():
    """The collection finds every operator (a renamed onnx module would silently drop cases)."""
    pytest.importorskip("onnx")
    found = {c.node.op_type for c in CASES}
    assert found == set(OPS), set(OPS) - found
    assert len({c.name for c in CASES}) == len(CASES)
