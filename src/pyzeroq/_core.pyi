"""Type stub of the private extension pyzeroq._core (numeric core; see pyzeroq.ops, pyzeroq.pareto, pyzeroq.integer)."""
from typing import Dict, List, Optional, Sequence, SupportsIndex, Tuple

import numpy as np
import numpy.typing as npt
from numpy.typing import ArrayLike

# --- quantize (csrc/bindings/quantize.cpp) ---------------------------------------------
# Array-like arguments: numpy arrays (or anything numpy.asarray accepts). Data are float32
# internally (C-contiguous native float32 used in place). Errors: ValueError / TypeError.


# Codes: unsigned (uint8 for bits <= 8, else uint16) or, with signed=True, int8 / int16;
# narrow_range raises qmin by one.
MIN_BITS: int  # code widths every kernel takes (kernels/quantize.hpp)
MAX_BITS: int
_Codes = npt.NDArray[np.uint8] | npt.NDArray[np.uint16] | npt.NDArray[np.int8] | npt.NDArray[np.int16]

def quantize(
    x: npt.ArrayLike, scale: npt.ArrayLike, zero_point: npt.ArrayLike, bits: SupportsIndex,
    axis: SupportsIndex | None = None, *, signed: bool = False, narrow_range: bool = False,
) -> _Codes: ...
def dequantize(
    q: _Codes, scale: npt.ArrayLike, zero_point: npt.ArrayLike, axis: SupportsIndex | None = None,
) -> npt.NDArray[np.float32]: ...
def fake_quantize(
    x: npt.ArrayLike, scale: npt.ArrayLike, zero_point: npt.ArrayLike, bits: SupportsIndex,
    axis: SupportsIndex | None = None, *, signed: bool = False, narrow_range: bool = False,
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]: ...
def ste_grad(
    grad: npt.ArrayLike, x: npt.ArrayLike, scale: npt.ArrayLike, zero_point: npt.ArrayLike, bits: SupportsIndex,
    axis: SupportsIndex | None = None, *, signed: bool = False, narrow_range: bool = False,
) -> npt.NDArray[np.float32]: ...
def asymmetric_params(
    x: npt.ArrayLike, bits: SupportsIndex, axis: SupportsIndex | None = None, percentile: float | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]: ...
def symmetric_params(
    x: npt.ArrayLike, bits: SupportsIndex, axis: SupportsIndex | None = None, percentile: float | None = None, *,
    signed: bool = True, narrow_range: bool = False,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]: ...
def _quantize_reference(
    x: npt.ArrayLike, scale: npt.ArrayLike, zero_point: npt.ArrayLike, bits: SupportsIndex,
    axis: SupportsIndex | None = None, *, signed: bool = False, narrow_range: bool = False,
) -> _Codes: ...
def _dequantize_reference(
    q: _Codes, scale: npt.ArrayLike, zero_point: npt.ArrayLike, axis: SupportsIndex | None = None,
) -> npt.NDArray[np.float32]: ...
def _fake_quantize_reference(
    x: npt.ArrayLike, scale: npt.ArrayLike, zero_point: npt.ArrayLike, bits: SupportsIndex,
    axis: SupportsIndex | None = None, *, signed: bool = False, narrow_range: bool = False,
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]: ...
def _ste_grad_reference(
    grad: npt.ArrayLike, x: npt.ArrayLike, scale: npt.ArrayLike, zero_point: npt.ArrayLike, bits: SupportsIndex,
    axis: SupportsIndex | None = None, *, signed: bool = False, narrow_range: bool = False,
) -> npt.NDArray[np.float32]: ...
def _symmetric_params_reference(
    x: npt.ArrayLike, bits: SupportsIndex, axis: SupportsIndex | None = None, percentile: float | None = None, *,
    signed: bool = True, narrow_range: bool = False,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]: ...

# --- pareto (csrc/bindings/pareto.cpp); private helpers behind pyzeroq.pareto ---

pareto_max_options: int

def pareto_frontier_dp(
    sensitivity: npt.ArrayLike,  # float64 [L, B], finite
    qcost: npt.ArrayLike,  # int64 [L, B], >= 0; entries > capacity are never chosen
    capacity: int,
    last_only: bool = False,
    reference: bool = False,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Exact DP over integer total costs 0..capacity -> (cost[P], total[P], choice[P, L])."""

def pareto_k_best(
    sensitivity: npt.ArrayLike,
    qcost: npt.ArrayLike,
    capacity: int,
    k: int,
    reference: bool = False,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """k best per integer total cost -> (cost[M], total[M, k] inf-padded, choice[M, k, L] -1-padded, count[M])."""

def pareto_top_pairs(
    prefix_value: npt.ArrayLike,
    prefix_cost: npt.ArrayLike,
    cand_value: npt.ArrayLike,
    cand_cost: npt.ArrayLike,
    lo: float,
    width: float,
    nbins: int,
    max_cost: float,
    k: int,
    reference: bool = False,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64],
           npt.NDArray[np.float64]]:
    """Per size bin the k best feasible (prefix, candidate) pairs -> (bin, prefix, cand, estimate, size)."""

# --- integer ALU simulator (csrc/bindings/integer.cpp); public wrappers: pyzeroq/integer/simulate.py ---
# Codes: numpy uint8 arrays; outputs uint8 (out_bits <= 8) or uint16. Scales are float32.
# rounding: "float32_rne" | "gemmlowp" | "dyadic"; dyadic_rounding: "half_even" | "half_up" | "half_away";
# overflow: "wrap" | "saturate" | "error"; dyadic_shift -1 = none;
# impl: "reference" | "fast" | "fast_avx512vnni" | "fast_avxvnni" | "fast_avx2" | "fast_generic" (ValueError
# naming impl when this CPU lacks the path; integer_available_impls() lists the ones it runs).
# Stats dict keys: "max_abs_acc", "bits_needed", "overflow_count", "min_acc", "max_acc".
# integer_conv_integer / integer_matmul_integer return the int32 accumulators (after the acc model).


class AccumulatorOverflowError(ValueError):
    """overflow="error" and an accumulator beyond acc_bits; pyzeroq.integer re-raises it as its own
    AccumulatorOverflowError (which can name the layer)."""


class IntegerWeightCache:
    """Packed weights of one conv / matmul layer kept across calls (pyzeroq.integer.WeightCache)."""
    def __init__(self) -> None: ...
    @property
    def nbytes(self) -> int: ...


def integer_available_impls() -> List[str]: ...
def integer_qlinear_conv2d(x: np.ndarray, x_scale: float, x_zero_point: ArrayLike, w: np.ndarray,
                           w_scale: ArrayLike, w_zero_point: ArrayLike, y_scale: float, y_zero_point: ArrayLike,
                           bias: Optional[ArrayLike], stride: Sequence[int], padding: Sequence[int],
                           dilation: Sequence[int], groups: int, rounding: str, out_bits: int, acc_bits: int,
                           overflow: str, relu: bool, impl: str, dyadic_rounding: str, dyadic_bits: int,
                           dyadic_shift: int, weight_cache: Optional[IntegerWeightCache] = None
                           ) -> Tuple[np.ndarray, Dict[str, int]]: ...
def integer_qlinear_matmul(a: np.ndarray, a_scale: float, a_zero_point: ArrayLike, b: np.ndarray,
                           b_scale: ArrayLike, b_zero_point: ArrayLike, y_scale: float, y_zero_point: ArrayLike,
                           bias: Optional[ArrayLike], rounding: str, out_bits: int, acc_bits: int, overflow: str,
                           relu: bool, impl: str, dyadic_rounding: str, dyadic_bits: int,
                           dyadic_shift: int, weight_cache: Optional[IntegerWeightCache] = None
                           ) -> Tuple[np.ndarray, Dict[str, int]]: ...
def integer_conv_integer(x: np.ndarray, x_zero_point: ArrayLike, w: np.ndarray, w_zero_point: ArrayLike,
                         bias: Optional[ArrayLike], stride: Sequence[int], padding: Sequence[int],
                         dilation: Sequence[int], groups: int, acc_bits: int, overflow: str,
                         impl: str, weight_cache: Optional[IntegerWeightCache] = None
                         ) -> Tuple[npt.NDArray[np.int32], Dict[str, int]]: ...
def integer_matmul_integer(a: np.ndarray, a_zero_point: ArrayLike, b: np.ndarray, b_zero_point: ArrayLike,
                           bias: Optional[ArrayLike], acc_bits: int, overflow: str,
                           impl: str, weight_cache: Optional[IntegerWeightCache] = None
                           ) -> Tuple[npt.NDArray[np.int32], Dict[str, int]]: ...
def integer_requantize(acc: np.ndarray, multiplier: ArrayLike, y_zero_point: ArrayLike, axis: int, has_axis: bool,
                       rounding: str, out_bits: int, relu: bool, dyadic_rounding: str, dyadic_bits: int,
                       dyadic_shift: int) -> np.ndarray: ...
def integer_qadd(a: np.ndarray, a_scale: float, a_zero_point: ArrayLike, b: np.ndarray, b_scale: float,
                 b_zero_point: ArrayLike, y_scale: float, y_zero_point: ArrayLike, rounding: str, out_bits: int,
                 relu: bool, dyadic_rounding: str, dyadic_bits: int, dyadic_shift: int) -> np.ndarray: ...
def integer_qmul(a: np.ndarray, a_scale: float, a_zero_point: ArrayLike, b: np.ndarray, b_scale: float,
                 b_zero_point: ArrayLike, y_scale: float, y_zero_point: ArrayLike, rounding: str, out_bits: int,
                 relu: bool, dyadic_rounding: str, dyadic_bits: int, dyadic_shift: int) -> np.ndarray: ...
def integer_max_pool2d(x: np.ndarray, kernel_size: Sequence[int], stride: Sequence[int],
                       padding: Sequence[int]) -> np.ndarray: ...
def integer_avg_pool2d(x: np.ndarray, x_zero_point: ArrayLike, kernel_size: Sequence[int], stride: Sequence[int],
                       padding: Sequence[int], count_include_pad: bool, rounding: str) -> np.ndarray: ...
def integer_global_avg_pool(x: np.ndarray, x_scale: float, x_zero_point: ArrayLike, y_scale: float,
                            y_zero_point: ArrayLike, rounding: str, out_bits: int, dyadic_rounding: str,
                            dyadic_bits: int, dyadic_shift: int) -> np.ndarray: ...
def integer_quantize_multiplier(multiplier: float) -> Tuple[int, int]: ...
def integer_dyadic_multiplier(multiplier: float, dyadic_bits: int, dyadic_shift: int) -> Tuple[int, int]: ...

# thread pool of every kernel (bindings/parallel.cpp)
MAX_THREADS: int
MIN_PARALLEL_WORK: int
def set_num_threads(num_threads: int) -> None: ...
def get_num_threads() -> int: ...
def hardware_threads() -> int: ...
def _pool_thread_ids(items: int, timeout_s: float) -> List[int]: ...
