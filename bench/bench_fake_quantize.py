"""fake_quantize on a 4M-element float32 tensor: pyzeroq vs torch vs a plain memory copy.

Run (pytest-benchmark, one run, all groups):
    PYZEROQ_CORE_DIR=build/quant/out PYTHONPATH=src python -m pytest bench/bench_fake_quantize.py -q
Ratios only (script mode; also printed by test_print_ratios with -s):
    PYZEROQ_CORE_DIR=build/quant/out PYTHONPATH=src python bench/bench_fake_quantize.py

Every benchmark first checks its result against torch's kernel. torch multiplies by
inv_scale = f32(1 / scale) where we divide by scale (one float32 division, as onnxruntime);
the two can differ only where x / scale lies within a few ulps of a half-integer, and then by
exactly one code: `check_against_torch` asserts precisely that (exact equality elsewhere).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timing import best_time

from pyzeroq import ops

SHAPE = (64, 65536)  # 4M float32 = 16 MiB, per channel along axis 0 (64 channels)
AXIS = 0
BITS = 8
QMAX = 2**BITS - 1
# |x*f32(1/s) - x/s| <= ~3 float32 roundings of the quotient: a disagreement needs x/s that close
# to k + 0.5 (relative). Allow 8 ulps of margin.
NEAR_TIE_REL = 8 * 2.0**-24


def make_data(seed: int = 0, shape: tuple[int, int] = SHAPE):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 3, (shape[0], 1))).astype(np.float32)
    scale = np.float32(rng.uniform(4, 10, shape[0]) / QMAX).astype(np.float32)
    zp = rng.integers(QMAX // 4, 3 * QMAX // 4, shape[0]).astype(np.int32)
    # constructed exact ties x / s == k + 0.5 (and the data runs past the clamp range too)
    ks = rng.integers(-200, 200, shape[0] * 16) + 0.5
    rows = np.repeat(np.arange(shape[0]), 16)
    x[rows, np.tile(np.arange(16), shape[0])] = (ks.astype(np.float32) * scale[rows]).astype(np.float32)
    return x, scale, zp


def check_against_torch(ours: np.ndarray, theirs: np.ndarray, x: np.ndarray, scale, zp) -> int:
    """Exact equality except one-code differences at (near-)ties of x / scale; returns their count."""
    s = np.broadcast_to(np.asarray(scale, np.float32).reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
    diff = ours != theirs
    if not diff.any():
        return 0
    ratio = x[diff].astype(np.float64) / s[diff].astype(np.float64)  # exact-ish quotient
    dist = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5)
    assert np.all(dist <= NEAR_TIE_REL * np.maximum(np.abs(ratio), 1.0)), "difference away from a tie"
    codes = np.abs(ours[diff].astype(np.float64) - theirs[diff].astype(np.float64)) / s[diff]
    # each side is f32(s * (q - zp)), |q - zp| <= QMAX: one rounding of up to QMAX codes apiece
    np.testing.assert_allclose(codes, 1.0, rtol=QMAX * 2.0**-23)
    return int(diff.sum())


@pytest.fixture(scope="module")
def data():
    x, scale, zp = make_data()
    xt = torch.from_numpy(x)
    ref_pc = torch.fake_quantize_per_channel_affine(xt, torch.from_numpy(scale), torch.from_numpy(zp),
                                                    AXIS, 0, QMAX).numpy()
    ref_pt = torch.fake_quantize_per_tensor_affine(xt, float(scale[0]), int(zp[0]), 0, QMAX).numpy()
    return x, scale, zp, ref_pc, ref_pt


def test_check_against_torch_sees_ties():
    """The tie cases exist in the data and are the only place where torch and we may differ."""
    x, scale, zp = make_data()
    ours = ops.fake_quantize(x, scale, zp, BITS, AXIS)
    theirs = torch.fake_quantize_per_channel_affine(torch.from_numpy(x), torch.from_numpy(scale),
                                                    torch.from_numpy(zp), AXIS, 0, QMAX).numpy()
    n = check_against_torch(ours, theirs, x, scale, zp)
    print(f"\n{n} of {x.size} elements differ by one code at (near-)ties (torch multiplies by 1/scale)")
    with pytest.raises(AssertionError):  # a non-tie difference is caught
        bad = ours.copy()
        bad[1, 100] += scale[1]
        check_against_torch(bad, theirs, x, scale, zp)


@pytest.mark.benchmark(group="fake_quantize_4M_per_channel")
def test_ours_per_channel(benchmark, data):
    x, scale, zp, ref_pc, _ = data
    out = np.empty_like(x)
    check_against_torch(ops.fake_quantize(x, scale, zp, BITS, AXIS, out=out), ref_pc, x, scale, zp)
    benchmark(ops.fake_quantize, x, scale, zp, BITS, AXIS, out=out)


@pytest.mark.benchmark(group="fake_quantize_4M_per_channel")
def test_ours_per_channel_alloc(benchmark, data):
    x, scale, zp, ref_pc, _ = data
    check_against_torch(ops.fake_quantize(x, scale, zp, BITS, AXIS), ref_pc, x, scale, zp)
    benchmark(ops.fake_quantize, x, scale, zp, BITS, AXIS)


@pytest.mark.benchmark(group="fake_quantize_4M_per_channel")
def test_torch_per_channel(benchmark, data):
    x, scale, zp, ref_pc, _ = data
    xt, st, zt = torch.from_numpy(x), torch.from_numpy(scale), torch.from_numpy(zp)
    check_against_torch(ops.fake_quantize(x, scale, zp, BITS, AXIS), ref_pc, x, scale, zp)
    benchmark(torch.fake_quantize_per_channel_affine, xt, st, zt, AXIS, 0, QMAX)


@pytest.mark.benchmark(group="fake_quantize_4M_per_tensor")
def test_ours_per_tensor(benchmark, data):
    x, scale, zp, _, ref_pt = data
    out = np.empty_like(x)
    check_against_torch(ops.fake_quantize(x, scale[0], zp[0], BITS, out=out), ref_pt, x, scale[0], zp[0])
    benchmark(ops.fake_quantize, x, scale[0], zp[0], BITS, out=out)


@pytest.mark.benchmark(group="fake_quantize_4M_per_tensor")
def test_torch_per_tensor(benchmark, data):
    x, scale, zp, _, ref_pt = data
    xt = torch.from_numpy(x)
    check_against_torch(ops.fake_quantize(x, scale[0], zp[0], BITS), ref_pt, x, scale[0], zp[0])
    benchmark(torch.fake_quantize_per_tensor_affine, xt, float(scale[0]), int(zp[0]), 0, QMAX)


@pytest.mark.benchmark(group="fake_quantize_4M_per_tensor")
def test_memcpy(benchmark, data):
    x = data[0]
    dst = np.empty_like(x)
    np.copyto(dst, x)
    assert np.array_equal(dst, x)
    benchmark(np.copyto, dst, x)


# ------------------------------------------------------------------ ratios in one run


def measure_ratios(repeat: int = 20) -> dict[str, float]:
    x, scale, zp = make_data()
    xt, st, zt = torch.from_numpy(x), torch.from_numpy(scale), torch.from_numpy(zp)
    out = np.empty_like(x)
    s0, z0 = float(scale[0]), int(zp[0])
    slow = max(3, repeat // 4)  # torch is ~20x slower: fewer repeats
    t = {
        "ours_pc": best_time(lambda: ops.fake_quantize(x, scale, zp, BITS, AXIS, out=out), repeat),
        "ours_pc_alloc": best_time(lambda: ops.fake_quantize(x, scale, zp, BITS, AXIS), repeat),
        "ours_pt": best_time(lambda: ops.fake_quantize(x, s0, z0, BITS, out=out), repeat),
        "torch_pc": best_time(lambda: torch.fake_quantize_per_channel_affine(xt, st, zt, AXIS, 0, QMAX), slow),
        "torch_pt": best_time(lambda: torch.fake_quantize_per_tensor_affine(xt, s0, z0, 0, QMAX), slow),
        "memcpy": best_time(lambda: np.copyto(out, x), repeat),
    }
    gbs = 2 * x.nbytes / 1e9  # bytes read + written per call
    return {
        **{f"{k}_ms": v * 1e3 for k, v in t.items()},
        "speedup_vs_torch_per_channel": t["torch_pc"] / t["ours_pc"],
        "speedup_vs_torch_per_tensor": t["torch_pt"] / t["ours_pt"],
        "speedup_vs_torch_per_channel_alloc": t["torch_pc"] / t["ours_pc_alloc"],
        "copy_bandwidth_fraction_per_channel": t["memcpy"] / t["ours_pc"],
        "copy_bandwidth_fraction_per_tensor": t["memcpy"] / t["ours_pt"],
        "memcpy_GB_per_s": gbs / t["memcpy"],
        "ours_pc_GB_per_s": gbs / t["ours_pc"],
        "torch_threads": torch.get_num_threads(),
    }


def _print(r: dict[str, float]) -> None:
    for k, v in r.items():
        print(f"{k:40s} {v:10.3f}")


def test_print_ratios():
    r = measure_ratios(repeat=10)
    print()
    _print(r)
    assert r["speedup_vs_torch_per_channel"] > 1 and r["speedup_vs_torch_per_tensor"] > 1


if __name__ == "__main__":
    _print(measure_ratios())
