"""The SIMD paths of the integer conv / matmul simulator (fast_avx512vnni, fast_avxvnni,
fast_avx2, fast_generic) against the reference loops, bit for bit: random cases (hypothesis),
constructed extremes (zero points at both ends, all-255 codes, reductions at the exact-int32
bound of the VNNI decomposition), the geometries the planar VNNI layout treats apart
(strides / padding / dilation, groups, depthwise, stacked images, matmul), every accumulator
mode, the packed-weight cache and the impl names. A path this CPU (or build) lacks is
skipped with the reason; ``pytest -rs`` prints it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pyzeroq as zq
import pyzeroq.integer as zi

PATHS = ("fast_avx512vnni", "fast_avxvnni", "fast_avx2", "fast_generic")
SX, SY = np.float32(0.05), np.float32(0.07)
CODE_MAX = 255
WEIGHT_OFFSET = 128  # the VNNI paths' int8 weights are w - 128; zw == 128 skips their sum-x term
VNNI_MAX_REDUCTION = (2**31 - 1) // (CODE_MAX * CODE_MAX)  # taps * Cg with an exact int32 result (33025)


@pytest.fixture(params=PATHS, scope="module")
def path(request):
    if request.param not in zi.available_impls():
        pytest.skip(f"{request.param} not run: this CPU / build lacks it (available: {zi.available_impls()})")
    return request.param


def conv_both(impl, x, zx, w, zw, bias=None, stride=1, pad=0, dil=1, groups=1, acc_bits=32, overflow="wrap",
              rounding="float32_rne", out_bits=8, relu=False, zy=100, sw=None):
    """(codes, stats) of qlinear_conv2d and (acc, stats) of conv_integer, or the error message."""
    o = w.shape[0]
    sw = np.linspace(0.002, 0.02, o).astype(np.float32) if sw is None else sw
    out = []
    for fn, args, kw in (
        (zi.qlinear_conv2d, (x, SX, zx, w, sw, zw, SY, zy, bias, stride, pad, dil, groups),
         dict(rounding=rounding, out_bits=out_bits, acc_bits=acc_bits, overflow=overflow, relu=relu)),
        (zi.conv_integer, (x, zx, w, zw, bias, stride, pad, dil, groups, acc_bits, overflow), {}),
    ):
        try:
            out.append(fn(*args, impl=impl, **kw))
        except ValueError as e:
            out.append(str(e))
    return out


def assert_same(got, want):
    for g, r in zip(got, want):
        if isinstance(r, str):
            assert g == r
            continue
        assert g[0].dtype == r[0].dtype and g[0].shape == r[0].shape
        np.testing.assert_array_equal(g[0], r[0])
        assert g[1] == r[1]


def check_conv(impl, *args, **kw):
    want = conv_both("reference", *args, **kw)
    assert_same(conv_both(impl, *args, **kw), want)
    return want


def rand_conv(rng, n, c, h, w, o, k, groups, zw128=False):
    x = rng.integers(0, CODE_MAX + 1, (n, c, h, w), dtype=np.uint8)
    wt = rng.integers(0, CODE_MAX + 1, (o, c // groups, k, k), dtype=np.uint8)
    zw = np.full(o, WEIGHT_OFFSET) if zw128 else rng.integers(0, CODE_MAX + 1, o)
    return x, int(rng.integers(0, CODE_MAX + 1)), wt, zw


# ---------------------------------------------------------------- random cases
@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), groups=st.sampled_from([1, 1, 2, 3]), depthwise=st.booleans(),
       k=st.integers(1, 5), stride=st.integers(1, 3), dil=st.integers(1, 3),
       pad=st.tuples(*[st.integers(0, 3)] * 4), n=st.integers(1, 5), zw128=st.booleans(),
       with_bias=st.booleans(), acc=st.sampled_from([(32, "wrap"), (18, "wrap"), (16, "saturate"), (20, "error")]),
       rounding=st.sampled_from(["float32_rne", "float32_rne", "gemmlowp", "dyadic"]),
       out_bits=st.sampled_from([8, 8, 4, 12]), relu=st.booleans())
def test_random_conv(path, seed, groups, depthwise, k, stride, dil, pad, n, zw128, with_bias, acc, rounding,
                     out_bits, relu):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(1, 24)) if depthwise else groups * int(rng.integers(1, 10))
    o, groups = (c, c) if depthwise else (groups * int(rng.integers(1, 20)), groups)
    h, w = (int(rng.integers(dil * (k - 1) + 1, 20)) for _ in range(2))
    x, zx, wt, zw = rand_conv(rng, n, c, h, w, o, k, groups, zw128)
    bias = rng.integers(-30000, 30000, o).astype(np.int32) if with_bias else None
    check_conv(path, x, zx, wt, zw, bias, stride, pad, dil, groups, acc_bits=acc[0], overflow=acc[1],
               rounding=rounding, out_bits=out_bits, relu=relu, zy=int(rng.integers(0, 1 << out_bits)))


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lead=st.sampled_from([(), (1,), (3,), (2, 2)]), m=st.integers(1, 40),
       k=st.integers(1, 300), n=st.integers(1, 40), per_column=st.booleans(),
       acc=st.sampled_from([(32, "wrap"), (20, "wrap"), (22, "saturate")]))
def test_random_matmul(path, seed, lead, m, k, n, per_column, acc):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, CODE_MAX + 1, lead + (m, k), dtype=np.uint8)
    b = rng.integers(0, CODE_MAX + 1, (k, n), dtype=np.uint8)
    za = int(rng.integers(0, CODE_MAX + 1))
    zb = rng.integers(0, CODE_MAX + 1, n) if per_column else int(rng.integers(0, CODE_MAX + 1))
    bias = rng.integers(-9999, 9999, n).astype(np.int32)
    sb = rng.uniform(0.001, 0.01, n).astype(np.float32)
    for impl_out in (zi.matmul_integer(a, za, b, zb, bias, *acc, impl=path),):
        want = zi.matmul_integer(a, za, b, zb, bias, *acc, impl="reference")
        np.testing.assert_array_equal(impl_out[0], want[0])
        assert impl_out[1] == want[1]
    got = zi.qlinear_matmul(a, 0.03, za, b, sb, zb, 0.2, 90, bias, acc_bits=acc[0], overflow=acc[1], impl=path)
    want = zi.qlinear_matmul(a, 0.03, za, b, sb, zb, 0.2, 90, bias, acc_bits=acc[0], overflow=acc[1],
                             impl="reference")
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1]


# ---------------------------------------------------------------- constructed extremes
# (x code, zx, w code, zw): every product at +-255 * 255 or 0; padding holds zx, so it adds 0 even at zx = 255
EXTREMES = [(255, 0, 0, 255), (255, 0, 255, 0), (0, 255, 255, 0), (0, 255, 0, 255), (255, 255, 0, 255),
            (255, 0, 128, 128), (0, 0, 255, 128), (255, 0, 255, 128)]


@pytest.mark.parametrize("xv,zx,wv,zw", EXTREMES)
@pytest.mark.parametrize("geom", [dict(c=16, o=16, k=3, pad=1), dict(c=7, o=9, k=1, pad=0),
                                  dict(c=12, o=12, k=3, pad=2, groups=12), dict(c=12, o=24, k=3, pad=1, groups=3),
                                  dict(c=5, o=8, k=4, pad=(0, 3, 1, 2), stride=2, dil=2)])
def test_extreme_codes(path, xv, zx, wv, zw, geom):
    g = {"groups": 1, "stride": 1, "dil": 1, **geom}
    x = np.full((2, g["c"], 9, 11), xv, np.uint8)
    w = np.full((g["o"], g["c"] // g["groups"], g["k"], g["k"]), wv, np.uint8)
    want = check_conv(path, x, zx, w, np.full(g["o"], zw), None, g["stride"], g["pad"], g["dil"], g["groups"])
    exact = (xv - zx) * (wv - zw) * (g["c"] // g["groups"]) * g["k"] ** 2  # an output that sees no padding
    assert want[0][1].max_abs_acc == abs(exact)


def test_mixed_weight_zero_points(path):
    # one group with zw = 128 everywhere (no sum-x term) beside one with zw at both ends
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (3, 8, 10, 10), dtype=np.uint8)
    w = rng.integers(0, 256, (16, 4, 3, 3), dtype=np.uint8)
    zw = np.array([128] * 8 + [0, 255] * 4)
    check_conv(path, x, 3, w, zw, None, 1, 1, 1, 2)


@pytest.mark.parametrize("k,cg", [(1, VNNI_MAX_REDUCTION), (1, VNNI_MAX_REDUCTION + 1), (3, VNNI_MAX_REDUCTION // 9)])
def test_reduction_at_the_int32_bound(path, k, cg):
    # |exact| = taps * Cg * 255 * 255: just below 2^31 at the bound (the VNNI paths run it), just
    # above one channel later (they fall back to the exact sequential loop)
    x = np.full((1, cg, k + 1, 2), 255, np.uint8)
    w = np.zeros((2, cg, k, k), np.uint8)
    bias = np.array([0, -(2**31) + 1], np.int32)
    for acc_bits, overflow in ((32, "wrap"), (32, "error"), (31, "wrap")):
        want = check_conv(path, x, 0, w, np.array([255, 255]), bias, 1, (k // 2, 0, k // 2, 0), acc_bits=acc_bits,
                          overflow=overflow)
    if k == 1 and cg == VNNI_MAX_REDUCTION:
        assert isinstance(want[1], tuple) and want[1][1].min_acc == -(2**31) + 1 - cg * 255 * 255


# ---------------------------------------------------------------- geometries
GEOMETRIES = [
    dict(n=4, c=24, o=40, hw=7, k=1),  # 1x1 on 7x7: images stacked in one unit
    dict(n=5, c=24, o=8, hw=7, k=1),  # N prime: no stacking
    dict(n=6, c=16, o=32, hw=14, k=1, stride=2),  # strided 1x1: packed subsampled
    dict(n=2, c=16, o=16, hw=40, k=3, pad=1),  # long rows: packed row by row
    dict(n=2, c=6, o=10, hw=35, k=3, pad=(2, 0, 1, 0), stride=2),  # long rows, stride 2, odd padded width
    dict(n=3, c=8, o=8, hw=16, k=3, pad=(1, 0, 2, 0)),  # no column padding: whole planes at once
    dict(n=1, c=3, o=64, hw=45, k=7, pad=3, stride=2),  # stem-like
    dict(n=2, c=9, o=7, hw=13, k=2, pad=1, stride=3, dil=3),
    dict(n=2, c=8, o=16, hw=9, k=3, pad=1, groups=8),  # depthwise multiplier 2: general path
    dict(n=3, c=20, o=20, hw=15, k=3, pad=1, stride=2, groups=20),  # depthwise stride 2
    dict(n=2, c=6, o=6, hw=17, k=4, pad=2, dil=2, groups=6),  # depthwise, even KH (zero second row)
    dict(n=2, c=5, o=5, hw=12, k=5, pad=(0, 1, 3, 2), stride=3, dil=2, groups=5),
    dict(n=4, c=64, o=72, hw=7, k=3, pad=1),  # deep layer: weight blocks outer, cached weights
    dict(n=3, c=40, o=40, hw=9, k=3, pad=1, groups=40),  # depthwise, channels in lanes: whole and partial blocks
    dict(n=1, c=33, o=33, hw=20, k=5, pad=(2, 1, 0, 3), stride=2, dil=2, groups=33),
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=[str(i) for i in range(len(GEOMETRIES))])
@pytest.mark.parametrize("zw128", [False, True])
def test_geometries(path, geom, zw128):
    g = {"stride": 1, "pad": 0, "dil": 1, "groups": 1, **geom}
    rng = np.random.default_rng(len(str(geom)) + zw128)
    x, zx, w, zw = rand_conv(rng, g["n"], g["c"], g["hw"], g["hw"] + 1, g["o"], g["k"], g["groups"], zw128)
    bias = rng.integers(-40000, 40000, g["o"]).astype(np.int32)
    check_conv(path, x, zx, w, zw, bias, g["stride"], g["pad"], g["dil"], g["groups"])


@pytest.mark.parametrize("acc_bits,overflow", [(12, "wrap"), (14, "saturate"), (16, "error"), (24, "wrap")])
@pytest.mark.parametrize("rounding", ["float32_rne", "gemmlowp", "dyadic"])
def test_accumulator_modes(path, acc_bits, overflow, rounding):
    rng = np.random.default_rng(acc_bits)
    x, zx, w, zw = rand_conv(rng, 2, 12, 8, 8, 10, 3, 1)
    bias = rng.integers(-3000, 3000, 10).astype(np.int32)
    want = check_conv(path, x, zx, w, zw, bias, 1, 1, acc_bits=acc_bits, overflow=overflow, rounding=rounding)
    assert isinstance(want[1], str) or want[1][1].overflow_count > 0 or want[1][1].bits_needed <= acc_bits


@pytest.mark.parametrize("out_bits,relu", [(12, False), (16, True), (3, True)])
def test_wide_and_narrow_codes(path, out_bits, relu):
    rng = np.random.default_rng(out_bits)
    x, zx, w, zw = rand_conv(rng, 3, 10, 9, 9, 12, 3, 1)
    check_conv(path, x, zx, w, zw, None, 1, 1, out_bits=out_bits, relu=relu, zy=(1 << out_bits) // 3)


def cached_conv(impl, cache, x, zx, w, zw, pad=1):
    sw = np.linspace(0.002, 0.02, w.shape[0]).astype(np.float32)
    return zi.qlinear_conv2d(x, SX, zx, w, sw, zw, SY, 100, None, 1, pad, impl=impl, weight_cache=cache)[0]


def test_weight_cache_sees_in_place_edits(path):
    rng = np.random.default_rng(11)
    x, zx, w, zw = rand_conv(rng, 2, 32, 6, 6, 64, 3, 1)
    cache = zi.WeightCache()
    want = lambda: cached_conv("reference", None, x, zx, w, zw)  # noqa: E731
    for _ in range(2):
        np.testing.assert_array_equal(cached_conv(path, cache, x, zx, w, zw), want())
    packs = path in ("fast_avx512vnni", "fast_avxvnni")  # the paths that pack weights keep them
    assert (cache.nbytes > w.size) == packs, cache.nbytes
    w[5, 3, 1, 1] ^= 0xFF  # one byte edited in place: repacked
    np.testing.assert_array_equal(cached_conv(path, cache, x, zx, w, zw), want())
    w[:] = rng.integers(0, 256, w.shape, dtype=np.uint8)
    np.testing.assert_array_equal(cached_conv(path, cache, x, zx, w, zw), want())


def test_one_weight_cache_across_layers_shapes_and_copies(path):
    """A cache handed different layers (shapes, groups, a new array with equal bytes, matmul) gives
    each its own result; copies and pickles of a cache are empty."""
    import copy
    import pickle

    rng = np.random.default_rng(12)
    cache = zi.WeightCache()
    layers = [rand_conv(rng, 1, 32, 5, 5, 40, 3, 1), rand_conv(rng, 1, 40, 5, 5, 32, 1, 1),
              rand_conv(rng, 2, 32, 7, 7, 64, 3, 2)]
    for x, zx, w, zw in layers + layers[:1]:
        groups = x.shape[1] // w.shape[1]
        sw = np.full(w.shape[0], 0.01, np.float32)
        got = zi.qlinear_conv2d(x, SX, zx, w, sw, zw, SY, 100, None, 1, 1, 1, groups, impl=path, weight_cache=cache)
        ref = zi.qlinear_conv2d(x, SX, zx, w, sw, zw, SY, 100, None, 1, 1, 1, groups, impl="reference")
        np.testing.assert_array_equal(got[0], ref[0])
        again = zi.conv_integer(x, zx, w.copy(), zw, None, 1, 1, 1, groups, impl=path, weight_cache=cache)
        np.testing.assert_array_equal(again[0], zi.conv_integer(x, zx, w, zw, None, 1, 1, 1, groups,
                                                                impl="reference")[0])
    a = rng.integers(0, 256, (3, 5, 48), dtype=np.uint8)
    b = rng.integers(0, 256, (48, 20), dtype=np.uint8)
    for _ in range(2):
        np.testing.assert_array_equal(zi.matmul_integer(a, 7, b, 9, impl=path, weight_cache=cache)[0],
                                      zi.matmul_integer(a, 7, b, 9, impl="reference")[0])
    for fresh in (copy.copy(cache), copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert isinstance(fresh, zi.WeightCache) and fresh.nbytes == 0


def test_weight_cache_argument_is_checked():
    x, zx, w, zw = rand_conv(np.random.default_rng(0), 1, 4, 5, 5, 4, 3, 1)
    with pytest.raises(TypeError, match="weight_cache"):
        zi.qlinear_conv2d(x, SX, zx, w, np.full(4, 0.01, np.float32), zw, SY, 0, weight_cache={})
    with pytest.raises(TypeError, match="weight_cache"):
        zi.matmul_integer(x[0, 0], zx, w[0, 0], 0, weight_cache="cache")


def test_integer_model_owns_its_weight_caches():
    """IntegerModel keeps one cache per layer step (int8 weights too: their +128 copy is made per
    call, the cache compares bytes, not addresses); a deep copy runs with empty ones and agrees."""
    import copy

    import torch

    from pyzeroq.integer.steps import LAYER_STEPS
    from pyzeroq.models import load_pretrained

    model = load_pretrained("resnet20")
    images, _ = zq.data.load_fashion_mnist("embedded")
    x = images[:4, None]
    for target in (None, "onnxruntime"):
        cfg = zq.QuantConfig(weight_bits=8, act_bits=8, calibration="gaussian", num_samples=8, target=target,
                             progress=False)
        q = zq.quantize(model, cfg, input_shape=(1, 28, 28))
        im = zq.to_integer(q)
        first = im(x)
        layer_steps = [s.name for s in im.steps if isinstance(s, LAYER_STEPS)]
        assert set(im._weight_caches) == set(layer_steps)
        twin = copy.deepcopy(im)
        assert all(c.nbytes == 0 for c in twin._weight_caches.values())  # none copied along
        for out in (im(x), twin(x)):
            torch.testing.assert_close(out, first, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 8])
def test_threads_agree(path, n):
    rng = np.random.default_rng(n)
    x, zx, w, zw = rand_conv(rng, n, 16, 20, 20, 24, 3, 1)
    xd, _, wd, zd = rand_conv(rng, n, 24, 20, 20, 24, 3, 24)
    before = zq.get_num_threads()
    try:
        got = {}
        for threads in (1, 2):
            zq.set_num_threads(threads)
            got[threads] = (conv_both(path, x, zx, w, zw, None, 1, 1), conv_both(path, xd, zx, wd, zd, None, 2, 1, 1, 24))
        for a, b in zip(got[1], got[2]):
            assert_same(a, b)
    finally:
        zq.set_num_threads(before)


# ---------------------------------------------------------------- impl names
def test_available_impls():
    impls = zi.available_impls()
    assert impls[:2] == ["reference", "fast"] and set(impls[2:]) <= set(PATHS) and "fast_generic" in impls
    a, b = np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8)
    with pytest.raises(ValueError, match="impl must be one of .*got 'gpu'"):
        zi.matmul_integer(a, 0, b, 0, impl="gpu")


def test_disabled_paths_raise_and_fall_back():
    code = """
import numpy as np, pyzeroq.integer as zi
impls = zi.available_impls()
assert "fast_avx512vnni" not in impls and "fast_avxvnni" not in impls, impls
try:
    zi.matmul_integer(np.zeros((2, 3), np.uint8), 0, np.zeros((3, 2), np.uint8), 0, impl="fast_avx512vnni")
except ValueError as e:
    assert "impl 'fast_avx512vnni' is not supported" in str(e), e
else:
    raise AssertionError("no ValueError")
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (2, 8, 9, 9), dtype=np.uint8); w = rng.integers(0, 256, (8, 8, 3, 3), dtype=np.uint8)
ref = zi.conv_integer(x, 7, w, 200, None, 1, 1, impl="reference")
got = zi.conv_integer(x, 7, w, 200, None, 1, 1, impl="fast")
assert (ref[0] == got[0]).all() and ref[1] == got[1]
print(impls)
"""
    env = dict(os.environ, PYZEROQ_DISABLE_SIMD="avx512vnni,avxvnni")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
