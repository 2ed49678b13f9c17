"""Integer accumulator output (ONNX MatMulInteger / ConvInteger + bias): the int32
accumulators of the simulator vs an independent numpy int64 reference, between the
reference and fast kernels, against qlinear_matmul / qlinear_conv2d, and against
onnxruntime's MatMulInteger."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_integer_conv import ref_conv_acc

import pyzeroq.integer as zi

# every implementation this CPU runs: reference, fast (= the best path), then each fast path
IMPLS = tuple(zi.available_impls())


# ---------------------------------------------------------------- reference
def ref_matmul_acc(a, za, b, zb, bias, acc_bits, overflow):
    """(acc int64 [..., M, N], overflow count, exact int64) from the formula:
    acc = bias[n] + sum_k (a[..., k] - za) * (b[k, n] - zb[n]) under the acc model;
    saturate clamps after the bias, then after each product in k ascending."""
    lo, hi = -(1 << (acc_bits - 1)), (1 << (acc_bits - 1)) - 1
    a64 = a.astype(np.int64) - int(za)
    b64 = b.astype(np.int64) - np.broadcast_to(np.asarray(zb, np.int64), (b.shape[1],))[None, :]
    b0 = np.zeros(b.shape[1], np.int64) if bias is None else np.asarray(bias, np.int64)
    exact = a64 @ b64 + b0
    if overflow == "saturate":
        acc = np.broadcast_to(np.clip(b0, lo, hi), exact.shape).copy()
        hit = np.broadcast_to((b0 < lo) | (b0 > hi), exact.shape).copy()
        for k in range(b.shape[0]):
            s = acc + a64[..., k:k + 1] * b64[k]
            hit |= (s < lo) | (s > hi)
            acc = np.clip(s, lo, hi)
        return acc, int(hit.sum()), exact
    out = (exact < lo) | (exact > hi)
    return ((exact - lo) & ((1 << acc_bits) - 1)) + lo, int(out.sum()), exact


def bits_needed(exact) -> int:
    lo, hi = min(int(exact.min()), 0), max(int(exact.max()), 0)
    b = 1
    while not (lo >= -(1 << (b - 1)) and hi <= (1 << (b - 1)) - 1):
        b += 1
    return b


def check_stats(stats, exact, count):
    assert stats.overflow_count == count
    assert stats.min_acc == min(int(exact.min()), 0) and stats.max_acc == max(int(exact.max()), 0)
    assert stats.max_abs_acc == max(-stats.min_acc, stats.max_acc)
    assert stats.bits_needed == bits_needed(exact)


def operands(rng, shape, n, per_column=True, bias_range=30000):
    k = shape[-1]
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = rng.integers(0, 256, (k, n), dtype=np.uint8)
    za = int(rng.integers(0, 256))
    zb = rng.integers(1, 256, n) if per_column else int(rng.integers(0, 256))
    bias = rng.integers(-bias_range, bias_range, n).astype(np.int32)
    return a, za, b, zb, bias


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,n", [((7, 40), 5), ((2, 3, 33), 17), ((1, 512), 10), ((40,), 3), ((13, 1), 1),
                                     ((64, 300), 40)])
def test_wrap_int32_exact(impl, shape, n):
    rng = np.random.default_rng(sum(shape) + n)
    a, za, b, zb, bias = operands(rng, shape, n)
    got, stats = zi.matmul_integer(a, za, b, zb, bias, impl=impl)
    want, count, exact = ref_matmul_acc(a, za, b, zb, bias, 32, "wrap")
    assert got.dtype == np.int32 and got.shape == shape[:-1] + (n,)
    np.testing.assert_array_equal(got, want)
    check_stats(stats, exact, count)
    assert count == 0


@pytest.mark.parametrize("overflow", ["wrap", "saturate"])
@pytest.mark.parametrize("acc_bits", [8, 12, 16, 20])
@pytest.mark.parametrize("impl", IMPLS)
def test_narrow_accumulator(overflow, acc_bits, impl):
    rng = np.random.default_rng(acc_bits)
    a, za, b, zb, bias = operands(rng, (9, 70), 19, bias_range=1 << (acc_bits - 1))
    got, stats = zi.matmul_integer(a, za, b, zb, bias, acc_bits, overflow, impl=impl)
    want, count, exact = ref_matmul_acc(a, za, b, zb, bias, acc_bits, overflow)
    assert count > 0
    np.testing.assert_array_equal(got, want)
    check_stats(stats, exact, count)


@pytest.mark.parametrize("impl", IMPLS)
def test_saturate_order_bias_then_k_ascending(impl):
    # products +200 then -100 in an 8-bit register: sat(0 + 200) = 127, 127 - 100 = 27
    # (k descending would give 100, the exact value, which fits)
    a = np.array([[200, 100]], np.uint8)
    b = np.array([[2], [0]], np.uint8)
    got, st_ = zi.matmul_integer(a, 0, b, 1, acc_bits=8, overflow="saturate", impl=impl)
    assert got.tolist() == [[27]] and st_.overflow_count == 1 and st_.max_acc == 100
    # the bias comes first: sat(200) = 127, 127 - 25500 -> -128, -128 + 0 = -128
    a = np.array([[255, 0]], np.uint8)
    b = np.array([[0], [255]], np.uint8)
    bias = np.array([200], np.int32)
    got, st_ = zi.matmul_integer(a, 0, b, 100, bias, acc_bits=8, overflow="saturate", impl=impl)
    assert got.tolist() == [[-128]] and st_.overflow_count == 1 and st_.min_acc == -25300
    got, st_ = zi.matmul_integer(a, 0, b, 100, bias, acc_bits=8, overflow="wrap", impl=impl)
    assert got.tolist() == [[((-25300 + 128) % 256) - 128]]


@pytest.mark.parametrize("impl", IMPLS)
def test_error_mode(impl):
    rng = np.random.default_rng(3)
    a, za, b, zb, bias = operands(rng, (4, 64), 6, bias_range=100)
    _, count, exact = ref_matmul_acc(a, za, b, zb, bias, 12, "error")
    assert count > 0
    with pytest.raises(ValueError, match=rf"accumulator overflow: {count} .*bits needed: {bits_needed(exact)}"):
        zi.matmul_integer(a, za, b, zb, bias, 12, "error", impl=impl)
    got, stats = zi.matmul_integer(a, za, b, zb, bias, 32, "error", impl=impl)  # fits: no error
    np.testing.assert_array_equal(got, exact)
    assert stats.overflow_count == 0


def test_no_bias_and_scalar_zero_points():
    rng = np.random.default_rng(5)
    a, za, b, zb, _ = operands(rng, (6, 25), 8, per_column=False)
    got, _ = zi.matmul_integer(a, za, b, zb)
    np.testing.assert_array_equal(got, ref_matmul_acc(a, za, b, zb, None, 32, "wrap")[0])
    got0, _ = zi.matmul_integer(a, 0, b, 0)
    np.testing.assert_array_equal(got0, a.astype(np.int64) @ b.astype(np.int64))


def test_per_column_zero_points_matter():
    rng = np.random.default_rng(6)
    a, za, b, zb, bias = operands(rng, (5, 30), 12)
    assert len(set(zb.tolist())) > 1 and (zb != 0).all()
    got, _ = zi.matmul_integer(a, za, b, zb, bias)
    np.testing.assert_array_equal(got, ref_matmul_acc(a, za, b, zb, bias, 32, "wrap")[0])
    for j in range(12):  # each column with its own scalar zero point
        col, _ = zi.matmul_integer(a, za, np.ascontiguousarray(b[:, j:j + 1]), int(zb[j]), bias[j:j + 1])
        np.testing.assert_array_equal(got[:, j:j + 1], col)


def test_matches_qlinear_matmul_accumulator():
    """The accumulator is what qlinear_matmul requantizes: M = 1 to 16-bit codes = acc + 32768."""
    rng = np.random.default_rng(8)
    a, za, b, zb, bias = operands(rng, (10, 20), 7, bias_range=3000)
    for acc_bits, overflow in [(32, "wrap"), (14, "wrap"), (14, "saturate")]:
        acc, st_acc = zi.matmul_integer(a, za, b, zb, bias, acc_bits, overflow)
        codes, st_codes = zi.qlinear_matmul(a, 1.0, za, b, 1.0, zb, 1.0, 32768, bias, out_bits=16,
                                            acc_bits=acc_bits, overflow=overflow)
        assert st_acc == st_codes
        np.testing.assert_array_equal(codes.astype(np.int64) - 32768, np.clip(acc, -32768, 32767))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 20), k=st.integers(1, 90), n=st.integers(1, 40),
       lead=st.sampled_from([(), (2,), (2, 3)]), acc_bits=st.integers(2, 32),
       overflow=st.sampled_from(["wrap", "saturate", "error"]), per_column=st.booleans(),
       with_bias=st.booleans())
def test_property_vs_reference(seed, m, k, n, lead, acc_bits, overflow, per_column, with_bias):
    rng = np.random.default_rng(seed)
    a, za, b, zb, bias = operands(rng, lead + (m, k), n, per_column, bias_range=1 << min(acc_bits, 31) - 1)
    bias = bias if with_bias else None
    want, count, exact = ref_matmul_acc(a, za, b, zb, bias, acc_bits, overflow)
    results = []
    for impl in IMPLS:
        if overflow == "error" and count:
            with pytest.raises(ValueError, match="accumulator overflow"):
                zi.matmul_integer(a, za, b, zb, bias, acc_bits, overflow, impl=impl)
            continue
        got, stats = zi.matmul_integer(a, za, b, zb, bias, acc_bits, overflow, impl=impl)
        np.testing.assert_array_equal(got, want)
        check_stats(stats, exact, count)
        results.append(got)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_fast_equals_reference_large():
    """Several threads, blocks of the fast kernel, partial tiles, bias near the int32 limits."""
    rng = np.random.default_rng(11)
    a, za, b, zb, _ = operands(rng, (3, 37, 700), 45)
    bias = rng.integers(-(2 ** 31), 2 ** 31 - 1, 45).astype(np.int32)
    for overflow in ("wrap", "saturate"):
        ref, st_ref = zi.matmul_integer(a, za, b, zb, bias, overflow=overflow, impl="reference")
        for impl in IMPLS[1:]:
            got, st_got = zi.matmul_integer(a, za, b, zb, bias, overflow=overflow, impl=impl)
            np.testing.assert_array_equal(got, ref)
            assert st_got == st_ref
        np.testing.assert_array_equal(ref, ref_matmul_acc(a, za, b, zb, bias, 32, overflow)[0])


def test_huge_reduction_takes_the_sequential_path():
    """K above the int32 lane limit of the packed kernel (2 * 16384 pairs): per-output loop."""
    rng = np.random.default_rng(12)
    a, za, b, zb, bias = operands(rng, (3, 40000), 4)
    want, count, exact = ref_matmul_acc(a, za, b, zb, bias, 32, "wrap")
    for impl in IMPLS:
        got, stats = zi.matmul_integer(a, za, b, zb, bias, impl=impl)
        np.testing.assert_array_equal(got, want)
        check_stats(stats, exact, count)


# ---------------------------------------------------------------- conv_integer
@pytest.mark.parametrize("groups,o,stride,pad,dil", [(1, 16, (1, 1), (1, 1, 1, 1), (1, 1)),
                                                     (8, 8, (2, 1), (0, 1, 2, 1), (1, 2)),
                                                     (2, 6, (1, 1), (0, 0, 0, 0), (1, 1))])
@pytest.mark.parametrize("acc_bits,overflow", [(32, "wrap"), (14, "wrap"), (14, "saturate")])
def test_conv_integer(groups, o, stride, pad, dil, acc_bits, overflow):
    rng = np.random.default_rng(o + acc_bits)
    x = rng.integers(0, 256, (2, 8, 9, 10), dtype=np.uint8)
    w = rng.integers(0, 256, (o, 8 // groups, 3, 3), dtype=np.uint8)
    zx, zw = int(rng.integers(0, 256)), rng.integers(1, 256, o)
    bias = rng.integers(-5000, 5000, o).astype(np.int32)
    got = {impl: zi.conv_integer(x, zx, w, zw, bias, stride, pad, dil, groups, acc_bits, overflow, impl=impl)
           for impl in IMPLS}
    for impl in IMPLS[1:]:
        np.testing.assert_array_equal(got[impl][0], got["reference"][0])
        assert got[impl][1] == got["reference"][1]
    exact = ref_conv_acc(x, zx, w, zw, bias, stride, pad, dil, groups)
    acc, stats = got["fast"]
    assert acc.dtype == np.int32 and acc.shape == exact.shape
    if overflow == "wrap":
        lo = -(1 << (acc_bits - 1))
        np.testing.assert_array_equal(acc, ((exact - lo) & ((1 << acc_bits) - 1)) + lo)
    codes, st_codes = zi.qlinear_conv2d(x, 1.0, zx, w, 1.0, zw, 1.0, 32768, bias, stride, pad, dil, groups,
                                        out_bits=16, acc_bits=acc_bits, overflow=overflow)
    assert stats == st_codes
    np.testing.assert_array_equal(codes.astype(np.int64) - 32768, np.clip(acc, -32768, 32767))


# ---------------------------------------------------------------- onnxruntime
def ort_matmul_integer(a, za, b, zb):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    zb_shape = [] if np.ndim(zb) == 0 else [b.shape[1]]
    inits = [
        helper.make_tensor("a_zp", TensorProto.UINT8, [], [int(za)]),
        helper.make_tensor("b", TensorProto.UINT8, list(b.shape), b.ravel().tolist()),
        helper.make_tensor("b_zp", TensorProto.UINT8, zb_shape, np.atleast_1d(zb).astype(np.uint8).tolist()),
    ]
    node = helper.make_node("MatMulInteger", ["a", "b", "a_zp", "b_zp"], ["y"])
    graph = helper.make_graph([node], "mmi", [helper.make_tensor_value_info("a", TensorProto.UINT8, list(a.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"a": a})[0]


@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize("shape,n", [((8, 64), 10), ((2, 5, 300), 33), ((1, 1), 1)])
def test_vs_onnxruntime_matmul_integer(per_column, shape, n):
    rng = np.random.default_rng(n + per_column)
    a, za, b, zb, _ = operands(rng, shape, n, per_column)
    want = ort_matmul_integer(a, za, b, zb)
    for impl in IMPLS:
        got, _ = zi.matmul_integer(a, za, b, zb, impl=impl)
        assert got.dtype == want.dtype == np.int32
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- bad arguments
def test_bad_arguments_name_the_argument():
    a, b = np.zeros((3, 4), np.uint8), np.zeros((4, 2), np.uint8)
    with pytest.raises(TypeError, match="a must have dtype uint8"):
        zi.matmul_integer(a.astype(np.int16), 0, b, 0)  # int8 is accepted (signed codes)
    with pytest.raises(TypeError, match="b must have dtype uint8"):
        zi.matmul_integer(a, 0, b.astype(np.int32), 0)
    with pytest.raises(TypeError, match="a must be"):
        zi.matmul_integer("a", 0, b, 0)
    with pytest.raises(ValueError, match="b must have shape"):
        zi.matmul_integer(a, 0, np.zeros((5, 2), np.uint8), 0)
    with pytest.raises(ValueError, match="b must have 2"):
        zi.matmul_integer(a, 0, np.zeros((1, 4, 2), np.uint8), 0)
    with pytest.raises(ValueError, match="empty"):
        zi.matmul_integer(np.zeros((3, 0), np.uint8), 0, np.zeros((0, 2), np.uint8), 0)
    with pytest.raises(ValueError, match="a_zero_point"):
        zi.matmul_integer(a, 256, b, 0)
    with pytest.raises(ValueError, match="a_zero_point"):
        zi.matmul_integer(a, -1, b, 0)
    with pytest.raises(ValueError, match="a_zero_point"):
        zi.matmul_integer(a, [0, 1], b, 0)
    with pytest.raises(TypeError, match="a_zero_point"):
        zi.matmul_integer(a, 0.5, b, 0)
    with pytest.raises(ValueError, match="b_zero_point"):
        zi.matmul_integer(a, 0, b, [0, 300])
    with pytest.raises(ValueError, match="b_zero_point"):
        zi.matmul_integer(a, 0, b, [0, 1, 2])
    with pytest.raises(ValueError, match="bias"):
        zi.matmul_integer(a, 0, b, 0, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="bias"):
        zi.matmul_integer(a, 0, b, 0, np.array([0, 2 ** 31], np.int64))
    with pytest.raises(TypeError, match="bias"):
        zi.matmul_integer(a, 0, b, 0, np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="acc_bits"):
        zi.matmul_integer(a, 0, b, 0, acc_bits=33)
    with pytest.raises(ValueError, match="overflow"):
        zi.matmul_integer(a, 0, b, 0, overflow="clip")
    with pytest.raises(ValueError, match="impl"):
        zi.matmul_integer(a, 0, b, 0, impl="gpu")
    x, w = np.zeros((1, 4, 5, 5), np.uint8), np.zeros((2, 4, 3, 3), np.uint8)
    with pytest.raises(ValueError, match="x_zero_point"):
        zi.conv_integer(x, 256, w, 0)
    with pytest.raises(ValueError, match="w_zero_point"):
        zi.conv_integer(x, 0, w, [1, 2, 3])
    with pytest.raises(ValueError, match="w must have shape"):
        zi.conv_integer(x, 0, np.zeros((2, 3, 3, 3), np.uint8), 0)
