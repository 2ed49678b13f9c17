"""One thread setting for every C++ kernel (pyzeroq.set_num_threads): validation, results
bit-identical at 1, 2 and 3 threads (sizes above the single-thread threshold, so chunks really
split), and safety with several Python threads and after fork."""

import multiprocessing
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import pyzeroq as zq
import pyzeroq.integer as zi
from pyzeroq import _core, ops
from pyzeroq.threads import MAX_THREADS, MIN_PARALLEL_WORK

THREAD_COUNTS = (1, 2, 3)
FORK_TIMEOUT_S = 60
POOL_WAIT_S = 10.0  # upper bound for the chunks of a probe job to meet (normally microseconds)


@pytest.fixture
def restore_threads():
    before = zq.get_num_threads()
    yield
    zq.set_num_threads(before)


def _at_each_thread_count(fn):
    """fn() at 1, 2 and 3 threads; asserts every result equals the 1-thread one bit for bit."""
    results = []
    for n in THREAD_COUNTS:
        zq.set_num_threads(n)
        assert zq.get_num_threads() == n
        results.append(fn())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return results[0]


def test_api_and_validation(restore_threads):
    fresh = subprocess.run([sys.executable, "-c", "import pyzeroq as zq; print(zq.get_num_threads())"],
                           capture_output=True, text=True, check=True)
    assert int(fresh.stdout) == _core.hardware_threads() == min(os.cpu_count(), MAX_THREADS)  # the default
    assert zi.set_num_threads is zq.set_num_threads  # the integer package's name is an alias
    assert "set_num_threads" in zq.__all__ and "get_num_threads" in zq.__all__
    zq.set_num_threads(np.int64(2))
    assert zq.get_num_threads() == 2
    for bad in (1.0, "2", None, True):
        with pytest.raises(TypeError, match="num_threads"):
            zq.set_num_threads(bad)
    for bad in (0, -1, MAX_THREADS + 1):
        with pytest.raises(ValueError, match="num_threads"):
            zq.set_num_threads(bad)
    with pytest.raises(ValueError, match="num_threads"):
        _core.set_num_threads(0)  # the binding checks too
    assert zq.get_num_threads() == 2


def test_one_persistent_pool(restore_threads):
    """A job of n chunks runs on n distinct threads (the caller and n - 1 workers), the same
    workers on every call (no thread start per call); at 1 thread everything runs on the caller."""
    zq.set_num_threads(3)
    first, second = (_core._pool_thread_ids(3, POOL_WAIT_S) for _ in range(2))
    assert len(set(first)) == 3 and set(first) == set(second)
    zq.set_num_threads(1)
    assert len(set(_core._pool_thread_ids(3, 0.0))) == 1
    zq.set_num_threads(2)  # restarted at the new count: the caller plus one worker
    assert len(set(_core._pool_thread_ids(2, POOL_WAIT_S))) == 2


def _float_data(seed=0, shape=(24, 8192)):
    assert np.prod(shape) >= 3 * MIN_PARALLEL_WORK  # three chunks at 3 threads
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    scale = rng.uniform(0.01, 0.05, shape[0]).astype(np.float32)
    zp = rng.integers(0, 256, shape[0]).astype(np.int32)
    return x, scale, zp


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_quantize_kernels_identical_across_thread_counts(restore_threads, axis):
    x, scale, zp = _float_data()
    if axis is None:
        scale, zp = scale[0], zp[0]
    elif axis == 1:
        x = np.ascontiguousarray(x.T)  # inner == 1: runs over consecutive channels
    grad = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)

    def run():
        q = ops.quantize(x, scale, zp, 8, axis=axis)
        return (q, ops.dequantize(q, scale, zp, axis=axis), ops.fake_quantize(x, scale, zp, 8, axis=axis),
                _core.ste_grad(grad, x, scale, zp, 8, axis), *ops.asymmetric_params(x, 8, axis=axis),
                *ops.asymmetric_params(x, 4, axis=axis, percentile=99.0))

    q = _at_each_thread_count(run)[0]
    assert q.dtype == np.uint8 and len(np.unique(q)) > 100


def _conv_case(seed, n, c, o, hw, k, groups=1):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, c, hw, hw), dtype=np.uint8)
    w = rng.integers(0, 256, (o, c // groups, k, k), dtype=np.uint8)
    bias = rng.integers(-5000, 5000, o).astype(np.int32)
    return dict(x=x, x_scale=0.02, x_zero_point=np.uint8(rng.integers(0, 256)), w=w,
                w_scale=rng.uniform(0.001, 0.01, o).astype(np.float32),
                w_zero_point=rng.integers(100, 156, o).astype(np.uint8), y_scale=0.7, y_zero_point=np.uint8(128),
                bias=bias, padding=k // 2, groups=groups)


@pytest.mark.parametrize("case", [
    dict(n=8, c=16, o=24, hw=12, k=3),             # many images: one task per image
    dict(n=1, c=16, o=40, hw=20, k=3),             # one image: tasks over positions
    dict(n=4, c=32, o=32, hw=16, k=3, groups=32),  # depthwise
])
@pytest.mark.parametrize("rounding", ["float32_rne", "gemmlowp"])
def test_integer_conv_identical_across_thread_counts(restore_threads, case, rounding):
    args = _conv_case(7, **case)
    run = lambda: zi.qlinear_conv2d(**args, rounding=rounding)  # noqa: E731
    codes, stats = _at_each_thread_count(lambda: (lambda r: (r[0], np.array(list(vars(r[1]).values()))))(run()))
    ref, _ = zi.qlinear_conv2d(**args, rounding=rounding, impl="reference")
    assert np.array_equal(codes, ref) and len(np.unique(codes)) > 20


def test_integer_saturating_conv_and_elementwise_identical(restore_threads):
    args = _conv_case(3, n=4, c=8, o=16, hw=12, k=3)
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (4, 16, 64, 64), dtype=np.uint8)
    b = rng.integers(0, 256, a.shape, dtype=np.uint8)
    acc = rng.integers(-(1 << 20), 1 << 20, (4, 16, 32, 32)).astype(np.int32)
    mult = rng.uniform(1e-5, 1e-3, 16).astype(np.float32)

    def run():
        sat, st = zi.qlinear_conv2d(**args, acc_bits=16, overflow="saturate")
        return (sat, st.overflow_count, zi.requantize(acc, mult, 128, axis=1),
                zi.qadd(a, 0.03, 120, b, 0.05, 130, 0.06, 125), zi.qmul(a, 0.03, 120, b, 0.05, 130, 0.06, 125),
                zi.max_pool2d(a, 3, 2, 1),
                zi.avg_pool2d(a, 120, 3, 2, 1), zi.global_avg_pool2d(a, 0.03, 120, 0.02, 128))

    out = _at_each_thread_count(run)
    assert out[1] > 0  # saturation happened


def test_calls_from_several_python_threads(restore_threads):
    """Concurrent calls (one uses the pool, others run inline) and a concurrent
    set_num_threads give the single-thread results."""
    x, scale, zp = _float_data(2)
    zq.set_num_threads(1)
    expected = ops.fake_quantize(x, scale, zp, 8, axis=0)
    zq.set_num_threads(2)
    errors, barrier = [], threading.Barrier(4)

    def worker(k):
        try:
            barrier.wait()
            for i in range(20):
                if k == 0 and i % 5 == 0:
                    zq.set_num_threads(2 + i % 2)
                if not np.array_equal(ops.fake_quantize(x, scale, zp, 8, axis=0), expected):
                    errors.append(f"thread {k} call {i}: result differs")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _child(x, scale, zp, expected, queue):
    queue.put(bool(np.array_equal(ops.fake_quantize(x, scale, zp, 8, axis=0), expected)))


def test_kernels_work_in_a_forked_child(restore_threads):
    x, scale, zp = _float_data(3)
    zq.set_num_threads(2)
    expected = ops.fake_quantize(x, scale, zp, 8, axis=0)  # the pool's workers are running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(x, scale, zp, expected, queue))
    proc.start()
    proc.join(FORK_TIMEOUT_S)
    if proc.is_alive():
        proc.kill()
        pytest.fail("kernel call in a forked child hung")
    assert proc.exitcode == 0 and queue.get(timeout=FORK_TIMEOUT_S) is True
