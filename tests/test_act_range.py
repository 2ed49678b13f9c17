"""MSE activation-range search: exact agreement with a plain numpy reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_models import trained_tiny

import pyzeroq as zq
from pyzeroq.modules import MSE_CLIP_STEPS, QuantAct, mse_clip_range


def _reference_range(values: np.ndarray, bits: int) -> tuple[float, float]:
    """Plain numpy: every a = k / steps, the float32 scale / zero-point formula, rne."""
    v = values.astype(np.float32).reshape(-1)
    lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
    qmax = 2 ** bits - 1
    best, best_err = None, np.inf
    for k in range(MSE_CLIP_STEPS, 0, -1):
        a = k / MSE_CLIP_STEPS
        rlo, rhi = np.float32(a * lo), np.float32(a * hi)
        if rhi - rlo == 0:
            scale, zp = np.float32(1.0), 0.0
        else:
            scale = np.float32((np.float64(rhi) - np.float64(rlo)) / qmax)
            zp = float(np.clip(np.rint(-np.float64(rlo) / np.float64(scale)), 0, qmax))
        codes = np.clip(np.rint(v / scale) + zp, 0, qmax)
        deq = ((codes - zp).astype(np.float32) * scale).astype(np.float32)
        err = float(np.square(deq.astype(np.float64) - v).sum())
        if err < best_err:
            best, best_err = (float(rlo), float(rhi)), err
    return best


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([2, 3, 4, 8]), st.sampled_from(["relu", "normal", "heavy"]))
def test_mse_range_equals_numpy_reference(seed, bits, kind):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(2000).astype(np.float32)
    if kind == "relu":
        v = np.maximum(v, 0)
    elif kind == "heavy":
        v = (rng.standard_t(2, 2000)).astype(np.float32)
    assert mse_clip_range(v, bits) == _reference_range(v, bits)


def test_mse_range_clips_a_long_tail_and_keeps_a_uniform_range():
    v = np.random.default_rng(0).exponential(1.0, 100000).astype(np.float32)  # max ~ 12
    lo, hi = mse_clip_range(v, 4)
    assert lo == 0 and 3 < hi < 0.7 * float(v.max())  # 16 levels: the tail is not worth them
    lo, hi = mse_clip_range(np.array([0.0, 1.0], dtype=np.float32), 4)  # grid points exactly: no clip
    assert (lo, hi) == (0.0, 1.0)


def test_mse_range_all_zero_ties_everywhere_and_keeps_the_widest():
    assert mse_clip_range(np.zeros(10, dtype=np.float32), 4) == (0.0, 0.0)


@pytest.mark.parametrize("values, match", [([], "no activation values"), ([np.nan, 1.0], "NaN or Inf"),
                                           ([1.0, -np.inf], "NaN or Inf")])
def test_mse_range_bad_values(values, match):
    with pytest.raises(ValueError, match=match):
        mse_clip_range(np.array(values, dtype=np.float32), 4)


def test_quant_act_rejects_unknown_range():
    with pytest.raises(ValueError, match="act_range"):
        QuantAct(4, act_range="kl")


def test_mse_range_lowers_w4a4_error_on_the_tiny_model():
    model = trained_tiny()
    fast = dict(num_samples=16, distill_iters=20, progress=False, weight_bits=4, act_bits=4)
    mm = zq.quantize(model, zq.QuantConfig(**fast), input_shape=(1, 16, 16))
    mse = zq.quantize(model, zq.QuantConfig(act_range="mse", **fast), input_shape=(1, 16, 16))
    scales = [(float(a.scale), float(b.scale)) for (n, a), (_, b) in
              zip(sorted(mm.named_modules()), sorted(mse.named_modules())) if isinstance(a, QuantAct)]
    assert scales and all(s_mse <= s_mm for s_mm, s_mse in scales)
    assert any(s_mse < s_mm for s_mm, s_mse in scales)
