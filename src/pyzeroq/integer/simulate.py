"""Integer ALU simulator: bit-exact int8 inference arithmetic (C++ underneath).

Every function takes integer codes -- uint8, or int8 (signed) in any
combination of inputs (ONNX S8S8, U8S8, S8U8, U8U8) -- with float32 scales and
integer zero points, following the argument order of the ONNX QLinear*
operators, and returns integer codes: uint8 (``out_bits <= 8``) / uint16, or
int8 / int16 for a signed output. The output is signed when ``y_signed=True``,
or, with ``y_signed=None``, when ``y_zero_point`` is a numpy / torch int8 or
int16 value (the ONNX rule: y_zero_point's type is the output type); pooling
keeps its input's type. Signed codes run on the unsigned kernels by an exact
offset shift (:mod:`pyzeroq.integer.signed` says why it is exact). numpy
arrays or CPU torch tensors are accepted; results are numpy arrays.

Requantization modes (``rounding=``), each matching a real runtime:

``"float32_rne"``
    onnxruntime QLinearConv / QLinearMatMul (MLAS requantizer) and torch
    fbgemm / qnnpack: ``M = f32(f32(x_scale * w_scale[c]) / y_scale)`` in float32,
    ``y = clamp(round_half_even(f32(acc) * M) + y_zero_point)``.
``"gemmlowp"``
    TFLite reference kernels: ``QuantizeMultiplier(x_scale * w_scale[c] / y_scale)``
    (double) -> Q31 multiplier and shift, then ``SaturatingRoundingDoublingHighMul``
    (ties toward +inf) and ``RoundingDivideByPOT`` (ties away from zero),
    ``+ y_zero_point``, clamp.
``"dyadic"``
    HAWQ-V3: ``M ~ b / 2^n`` (``b = round_half_even(M * 2^n)``; ``n`` fixed by
    ``dyadic_shift`` or chosen so ``b`` has ``dyadic_bits`` bits),
    ``y = clamp(round(acc * b / 2^n) + y_zero_point)`` with ``dyadic_rounding``
    ``"half_even"`` (torch.round, HAWQ-V3), ``"half_up"`` (ties toward +inf:
    add 2^(n-1), arithmetic shift) or ``"half_away"`` (ties away from zero).

Accumulator model: ``acc = bias + sum((x - zx) * (w - zw))`` is exact in int64;
an ``acc_bits`` register wraps (two's complement, order independent),
saturates (after every addition, in the order: bias, then input channel,
kernel row, kernel column -- matmul: bias, then k), or raises
:class:`AccumulatorOverflowError` (a ValueError; "error") when a final
accumulator value does not fit. Stats: ``max_abs_acc``
and ``bits_needed`` describe the final (exact) accumulator values;
``overflow_count`` counts outputs whose final value overflowed (wrap / error)
or that saturated at any step (saturate); ``min_acc`` / ``max_acc`` are the
range of the exact final values (0 included).

:func:`matmul_integer` / :func:`conv_integer` (ONNX MatMulInteger / ConvInteger,
plus an optional bias) return the int32 accumulators themselves instead of codes.

Implementations (``impl=`` of the conv / matmul functions), all bit-identical:
``"reference"`` (plain loops in the documented order), ``"fast"`` (the best of the
following this CPU runs), ``"fast_avx512vnni"`` (``vpdpbusd`` on 512-bit registers),
``"fast_avxvnni"`` (the 256-bit VEX form), ``"fast_avx2"`` (int16 ``vpmaddwd``) and
``"fast_generic"`` (portable C++). :func:`available_impls` lists what this CPU runs; asking
for another raises ValueError.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .. import _core
from ..threads import set_num_threads  # noqa: F401 (alias of pyzeroq.set_num_threads, kept public here)
from .signed import output_is_signed, signed_like_input, signed_output, unsigned_input, unsigned_output_zero_point

__all__ = [
    "AccStats",
    "WeightCache",
    "AccumulatorOverflowError",
    "qlinear_conv2d",
    "qlinear_matmul",
    "conv_integer",
    "matmul_integer",
    "requantize",
    "qadd",
    "qmul",
    "max_pool2d",
    "avg_pool2d",
    "global_avg_pool2d",
    "quantize_multiplier",
    "dyadic_multiplier",
    "requant_multiplier",
    "set_num_threads",
    "available_impls",
]

WeightCache = _core.IntegerWeightCache
WeightCache.__doc__ = (
    "Packed weights of one conv / matmul layer, kept across calls of :func:`qlinear_conv2d`, "
    ":func:`conv_integer`, :func:`qlinear_matmul` and :func:`matmul_integer` (``weight_cache=``): the fast "
    "paths that repack weights (VNNI) reuse them while the raw weight bytes and the layer's shape are "
    "unchanged (compared byte for byte on every call; weights edited in place are repacked). "
    "``IntegerModel`` holds one per layer step; fbgemm and onnxruntime likewise pack weights once per "
    "layer. Copies and pickles are empty caches. ``nbytes``: bytes held. Thread-safe.")


def _weight_cache(weight_cache):
    if weight_cache is not None and not isinstance(weight_cache, WeightCache):
        raise TypeError(f"weight_cache must be a pyzeroq.integer.WeightCache or None, got {type(weight_cache).__name__}")
    return weight_cache


IntOrSeq = Union[int, Sequence[int]]


def available_impls() -> list:
    """The ``impl=`` names this CPU runs: ``"reference"``, ``"fast"``, then the fast paths it
    supports, best first (``"fast"`` is the first of them)."""
    return list(_core.integer_available_impls())


@dataclass(frozen=True)
class AccStats:
    """Accumulator statistics of one integer conv / matmul call."""

    max_abs_acc: int
    bits_needed: int  # signed bits that hold every final accumulator value
    overflow_count: int
    min_acc: int = 0  # range of the exact final accumulator values, 0 included
    max_acc: int = 0


class AccumulatorOverflowError(ValueError):
    """An accumulator exceeded ``acc_bits`` with ``overflow="error"``. The message gives the
    count of overflowing values and the bits needed; ``layer`` names the layer when the
    integer model (:mod:`pyzeroq.integer.convert`) raised it, else None."""

    def __init__(self, message: str, layer: Optional[str] = None):
        super().__init__(message)
        self.layer = layer

    def __reduce__(self):
        return type(self), (str(self), self.layer)


@contextmanager
def _overflow_errors():
    """The one place where the extension's ``_core.AccumulatorOverflowError`` (recognized by its
    type) becomes :class:`AccumulatorOverflowError`, which can carry the layer's name."""
    try:
        yield
    except _core.AccumulatorOverflowError as exc:
        raise AccumulatorOverflowError(str(exc)) from exc


def _np(x, name: str):
    if x is None:
        return None
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # torch tensor
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple)):
        return np.asarray(x)
    raise TypeError(f"{name} must be a numpy array or a CPU torch tensor, got {type(x).__name__}")


def _ints(v: IntOrSeq, name: str, what: str) -> list:
    """``v`` as a list of Python ints: one int, or a sequence of them (TypeError naming ``name``)."""
    def is_int(e):
        return isinstance(e, (int, np.integer)) and not isinstance(e, bool)
    if is_int(v):
        return [int(v)]
    if isinstance(v, (str, bytes)) or not isinstance(v, (Sequence, np.ndarray)) or not all(is_int(e) for e in v):
        raise TypeError(f"{name} must be {what}, got {v!r}")
    return [int(e) for e in v]


def _pair(v: IntOrSeq, name: str) -> list:
    v = _ints(v, name, "an int or a pair of ints")
    if len(v) == 1:
        return v * 2
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v}")
    return v


def _padding(v: IntOrSeq) -> list:
    """int, (pad_h, pad_w) or (top, left, bottom, right) -> [top, left, bottom, right]."""
    v = _ints(v, "padding", "an int, a pair or a 4-tuple of ints")
    if len(v) == 1:
        return v * 4
    if len(v) == 2:
        return [v[0], v[1], v[0], v[1]]
    if len(v) == 4:
        return v
    raise ValueError(f"padding must be an int, a pair or a 4-tuple (top, left, bottom, right), got {v}")


def _output(y_signed: Optional[bool], y_zero_point, out_bits: int):
    """(signed, the y_zero_point the unsigned kernel gets) for an output of ``out_bits`` bits."""
    signed = output_is_signed(y_signed, y_zero_point)
    return signed, unsigned_output_zero_point(y_zero_point, out_bits, signed)


def _codes_out(codes: np.ndarray, signed: bool, out_bits: int) -> np.ndarray:
    return signed_output(codes, out_bits) if signed else codes


def _shift(dyadic_shift: Optional[int]) -> int:
    if dyadic_shift is None:
        return -1
    if int(dyadic_shift) < 0:
        raise ValueError("dyadic_shift must be None or >= 0")
    return int(dyadic_shift)


def qlinear_conv2d(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, bias=None,
                   stride: IntOrSeq = 1, padding: IntOrSeq = 0, dilation: IntOrSeq = 1, groups: int = 1,
                   rounding: str = "float32_rne", out_bits: int = 8, acc_bits: int = 32, overflow: str = "wrap",
                   relu: bool = False, *, impl: str = "fast", dyadic_rounding: str = "half_even",
                   dyadic_bits: int = 31, dyadic_shift: Optional[int] = None,
                   y_signed: Optional[bool] = None, weight_cache: Optional[WeightCache] = None) -> Tuple[np.ndarray, AccStats]:
    """ONNX QLinearConv on codes: x [N, C, H, W] uint8 or int8 (per-tensor zero point,
    padding holds it), w [O, C/groups, KH, KW] uint8 or int8 with per-output-channel
    (or scalar) scales and zero points, optional int32 bias at scale
    x_scale * w_scale[o]. ``relu`` clamps below at the output zero point.
    ``impl``: "fast" (the best SIMD path, threads), "reference" (plain loops) or one
    fast path of :func:`available_impls` (module docstring); all bit-identical.
    ``weight_cache``: a :class:`WeightCache` to keep this layer's packed weights in across calls.
    Output [N, O, OH, OW]: signed per ``y_signed`` / y_zero_point's dtype (module docstring)."""
    weight_cache = _weight_cache(weight_cache)
    x, x_zero_point, _ = unsigned_input(x, x_zero_point, "x")
    w, w_zero_point, _ = unsigned_input(w, w_zero_point, "w")
    signed, y_zero_point = _output(y_signed, y_zero_point, out_bits)
    with _overflow_errors():
        codes, st = _core.integer_qlinear_conv2d(
            _np(x, "x"), float(x_scale), _np(np.asarray(x_zero_point), "x_zero_point"), _np(w, "w"),
            _np(np.asarray(w_scale), "w_scale"), _np(np.asarray(w_zero_point), "w_zero_point"), float(y_scale),
            _np(np.asarray(y_zero_point), "y_zero_point"), _np(bias, "bias"), _pair(stride, "stride"),
            _padding(padding), _pair(dilation, "dilation"), int(groups), rounding, int(out_bits), int(acc_bits),
            overflow, bool(relu), impl, dyadic_rounding, int(dyadic_bits), _shift(dyadic_shift), weight_cache)
    return _codes_out(codes, signed, out_bits), AccStats(**st)


def qlinear_matmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point, bias=None,
                   rounding: str = "float32_rne", out_bits: int = 8, acc_bits: int = 32, overflow: str = "wrap",
                   relu: bool = False, *, impl: str = "fast", dyadic_rounding: str = "half_even",
                   dyadic_bits: int = 31, dyadic_shift: Optional[int] = None,
                   y_signed: Optional[bool] = None, weight_cache: Optional[WeightCache] = None) -> Tuple[np.ndarray, AccStats]:
    """ONNX QLinearMatMul: a [..., M, K] uint8 or int8 (per-tensor), b [K, N] uint8 or int8 with
    per-column (or scalar) scales / zero points, optional int32 bias [N]. Output [..., M, N],
    signed per ``y_signed`` / y_zero_point's dtype (module docstring); ``weight_cache`` as in
    :func:`qlinear_conv2d`."""
    weight_cache = _weight_cache(weight_cache)
    a, a_zero_point, _ = unsigned_input(a, a_zero_point, "a")
    b, b_zero_point, _ = unsigned_input(b, b_zero_point, "b")
    signed, y_zero_point = _output(y_signed, y_zero_point, out_bits)
    with _overflow_errors():
        codes, st = _core.integer_qlinear_matmul(
            _np(a, "a"), float(a_scale), np.asarray(a_zero_point), _np(b, "b"), np.asarray(b_scale),
            np.asarray(b_zero_point), float(y_scale), np.asarray(y_zero_point), _np(bias, "bias"), rounding,
            int(out_bits), int(acc_bits), overflow, bool(relu), impl, dyadic_rounding, int(dyadic_bits),
            _shift(dyadic_shift), weight_cache)
    return _codes_out(codes, signed, out_bits), AccStats(**st)


def matmul_integer(a, a_zero_point, b, b_zero_point, bias=None, acc_bits: int = 32, overflow: str = "wrap", *,
                   impl: str = "fast", weight_cache: Optional[WeightCache] = None) -> Tuple[np.ndarray, AccStats]:
    """ONNX MatMulInteger (plus an optional bias): the int32 accumulators, no requantization.

    a [..., M, K] uint8 or int8 with a per-tensor zero point ``za``, b [K, N] uint8 or int8
    with a scalar or per-column zero point ``zb`` [N], optional integer bias [N] (int32 range)::

        acc[..., m, n] = bias[n] + sum_k (a[..., m, k] - za) * (b[k, n] - zb[n])

    under the ``acc_bits`` / ``overflow`` accumulator model (module docstring):
    "wrap" gives the exact sum modulo 2^acc_bits (two's complement), "saturate"
    clamps after the bias and after every product in k ascending, "error" raises
    :class:`AccumulatorOverflowError` ("accumulator overflow ... bits needed ...") when a final value
    does not fit. Returns (int32 array [..., M, N], :class:`AccStats`); it equals
    what :func:`qlinear_matmul` would requantize. ``impl`` and ``weight_cache`` as in :func:`qlinear_conv2d`."""
    weight_cache = _weight_cache(weight_cache)
    a, a_zero_point, _ = unsigned_input(a, a_zero_point, "a")
    b, b_zero_point, _ = unsigned_input(b, b_zero_point, "b")
    with _overflow_errors():
        acc, st = _core.integer_matmul_integer(_np(a, "a"), np.asarray(a_zero_point), _np(b, "b"),
                                               np.asarray(b_zero_point), _np(bias, "bias"), int(acc_bits), overflow,
                                               impl, weight_cache)
    return acc, AccStats(**st)


def conv_integer(x, x_zero_point, w, w_zero_point, bias=None, stride: IntOrSeq = 1, padding: IntOrSeq = 0,
                 dilation: IntOrSeq = 1, groups: int = 1, acc_bits: int = 32, overflow: str = "wrap", *,
                 impl: str = "fast", weight_cache: Optional[WeightCache] = None) -> Tuple[np.ndarray, AccStats]:
    """ONNX ConvInteger (plus an optional bias [O]): the int32 accumulators
    [N, O, OH, OW] of :func:`qlinear_conv2d` (same arguments -- uint8 or int8 x and w --,
    formula and accumulator model, without the requantization)."""
    weight_cache = _weight_cache(weight_cache)
    x, x_zero_point, _ = unsigned_input(x, x_zero_point, "x")
    w, w_zero_point, _ = unsigned_input(w, w_zero_point, "w")
    with _overflow_errors():
        acc, st = _core.integer_conv_integer(
            _np(x, "x"), np.asarray(x_zero_point), _np(w, "w"), np.asarray(w_zero_point), _np(bias, "bias"),
            _pair(stride, "stride"), _padding(padding), _pair(dilation, "dilation"), int(groups), int(acc_bits),
            overflow, impl, weight_cache)
    return acc, AccStats(**st)


def requantize(acc, multiplier, y_zero_point, axis: Optional[int] = None, rounding: str = "float32_rne",
               out_bits: int = 8, relu: bool = False, *, dyadic_rounding: str = "half_even", dyadic_bits: int = 31,
               dyadic_shift: Optional[int] = None, y_signed: Optional[bool] = None) -> np.ndarray:
    """Requantize an int32 accumulator tensor with the real multiplier M
    (scalar, or one per index of ``axis``): float32_rne uses f32(M), gemmlowp and
    dyadic quantize M (as float64). Use :func:`requant_multiplier` to get the
    M a conv uses from its scales. Output of acc's shape, signed per ``y_signed`` /
    y_zero_point's dtype (module docstring)."""
    signed, y_zero_point = _output(y_signed, y_zero_point, out_bits)
    codes = _core.integer_requantize(_np(acc, "acc"), np.asarray(multiplier), np.asarray(y_zero_point),
                                     0 if axis is None else int(axis), axis is not None, rounding, int(out_bits),
                                     bool(relu), dyadic_rounding, int(dyadic_bits), _shift(dyadic_shift))
    return _codes_out(codes, signed, out_bits)


def requant_multiplier(x_scale, w_scale, y_scale, rounding: str = "float32_rne") -> np.ndarray:
    """M per output channel as the conv computes it: float32 ``f32(f32(sx*sw)/sy)``
    for float32_rne, float64 ``sx*sw/sy`` (of the float32 scales) otherwise. ValueError naming
    the scale unless every scale is a positive finite float32 (as :func:`qlinear_conv2d`)."""
    sx, sy = np.float32(x_scale), np.float32(y_scale)
    sw = np.atleast_1d(np.asarray(w_scale, dtype=np.float32))
    for name, value in (("x_scale", sx), ("w_scale", sw), ("y_scale", sy)):
        if not (np.all(np.isfinite(value)) and np.all(value > 0)):
            raise ValueError(f"{name} must be positive finite float32 values, got {value}")
    if rounding == "float32_rne":
        return ((sx * sw).astype(np.float32) / sy).astype(np.float32)
    return np.float64(sx) * sw.astype(np.float64) / np.float64(sy)


def qadd(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point, rounding: str = "float32_rne",
         relu: bool = False, out_bits: int = 8, *, dyadic_rounding: str = "half_even", dyadic_bits: int = 31,
         dyadic_shift: Optional[int] = None, y_signed: Optional[bool] = None) -> np.ndarray:
    """Residual add of two same-shape code tensors (uint8 or int8 each) with different scales
    (formulas in csrc/kernels/integer_elementwise.hpp):
    float32_rne ``clamp(rne(f32(f32(sa*(a-za)) + f32(sb*(b-zb))) / sy) + zy)``;
    gemmlowp = TFLite uint8 Add (left shift 20, three Q31 multipliers; TFLite's int8 Add is the
    same arithmetic on the differences); dyadic ``clamp(round(((a-za)*ba + (b-zb)*bb) / 2^n) + zy)``
    with one shared n. Output signed per ``y_signed`` / y_zero_point's dtype."""
    a, a_zero_point, _ = unsigned_input(a, a_zero_point, "a")
    b, b_zero_point, _ = unsigned_input(b, b_zero_point, "b")
    signed, y_zero_point = _output(y_signed, y_zero_point, out_bits)
    codes = _core.integer_qadd(_np(a, "a"), float(a_scale), np.asarray(a_zero_point), _np(b, "b"), float(b_scale),
                               np.asarray(b_zero_point), float(y_scale), np.asarray(y_zero_point), rounding,
                               int(out_bits), bool(relu), dyadic_rounding, int(dyadic_bits), _shift(dyadic_shift))
    return _codes_out(codes, signed, out_bits)


def qmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point, rounding: str = "float32_rne",
         relu: bool = False, out_bits: int = 8, *, dyadic_rounding: str = "half_even", dyadic_bits: int = 31,
         dyadic_shift: Optional[int] = None, y_signed: Optional[bool] = None) -> np.ndarray:
    """Elementwise product of two code tensors (uint8 or int8 each; e.g. squeeze-excite gating
    ``x * gate``), shapes broadcast as numpy does (formulas in csrc/kernels/integer_elementwise.hpp):
    float32_rne ``clamp(rne(f32(f32(sa*(a-za)) * f32(sb*(b-zb))) / sy) + zy)`` (the fake-quant
    model's float formula); gemmlowp = TFLite uint8 Mul (``acc = (a-za)*(b-zb)``,
    MultiplyByQuantizedMultiplier with ``M = sa*sb/sy``); dyadic ``round(acc * b / 2^n) + zy``.
    Output signed per ``y_signed`` / y_zero_point's dtype."""
    a, a_zero_point, _ = unsigned_input(a, a_zero_point, "a")
    b, b_zero_point, _ = unsigned_input(b, b_zero_point, "b")
    signed, y_zero_point = _output(y_signed, y_zero_point, out_bits)
    a, b = np.broadcast_arrays(_np(a, "a"), _np(b, "b"))
    codes = _core.integer_qmul(np.ascontiguousarray(a), float(a_scale), np.asarray(a_zero_point),
                               np.ascontiguousarray(b), float(b_scale), np.asarray(b_zero_point), float(y_scale),
                               np.asarray(y_zero_point), rounding, int(out_bits), bool(relu), dyadic_rounding,
                               int(dyadic_bits), _shift(dyadic_shift))
    return _codes_out(codes, signed, out_bits)


def max_pool2d(x, kernel_size: IntOrSeq, stride: Optional[IntOrSeq] = None, padding: IntOrSeq = 0) -> np.ndarray:
    """Max of codes (uint8 or int8; output of the same dtype) over each window (padding
    ignored); scale and zero point unchanged."""
    stride = kernel_size if stride is None else stride
    x, _, was_signed = unsigned_input(x, 0, "x")
    y = _core.integer_max_pool2d(_np(x, "x"), _pair(kernel_size, "kernel_size"), _pair(stride, "stride"),
                                 _padding(padding))
    return signed_like_input(y, was_signed)


def avg_pool2d(x, x_zero_point, kernel_size: IntOrSeq, stride: Optional[IntOrSeq] = None, padding: IntOrSeq = 0,
               count_include_pad: bool = False, rounding: str = "half_up") -> np.ndarray:
    """Integer average of codes (uint8 or int8; output of the same dtype): ``round(sum / count)``,
    ``half_up`` = TFLite's uint8 ``(sum + count/2) / count`` (ties toward +inf) or ``half_even``;
    padded positions are skipped, or count as the zero point with ``count_include_pad``. Scale /
    zero point unchanged. int8 codes: the same rules on the signed sum (exact by the shift);
    TFLite's *int8* AveragePool rounds ties away from zero instead, so it differs from
    ``half_up`` exactly when ``sum / count`` is a negative tie (``k - 1/2``, sum < 0)."""
    stride = kernel_size if stride is None else stride
    x, x_zero_point, was_signed = unsigned_input(x, x_zero_point, "x")
    y = _core.integer_avg_pool2d(_np(x, "x"), np.asarray(x_zero_point), _pair(kernel_size, "kernel_size"),
                                 _pair(stride, "stride"), _padding(padding), bool(count_include_pad), rounding)
    return signed_like_input(y, was_signed)


def global_avg_pool2d(x, x_scale, x_zero_point, y_scale, y_zero_point, rounding: str = "float32_rne",
                      out_bits: int = 8, *, dyadic_rounding: str = "half_even", dyadic_bits: int = 31,
                      dyadic_shift: Optional[int] = None, y_signed: Optional[bool] = None) -> np.ndarray:
    """[N, C, H, W] (uint8 or int8) -> [N, C, 1, 1]: ``acc = sum(x - zx)`` (exact), then one
    requantization with ``M = sx / (sy * H * W)`` (float32: ``f32(f32(sx/sy) / f32(H*W))``).
    Output signed per ``y_signed`` / y_zero_point's dtype (module docstring)."""
    x, x_zero_point, _ = unsigned_input(x, x_zero_point, "x")
    signed, y_zero_point = _output(y_signed, y_zero_point, out_bits)
    codes = _core.integer_global_avg_pool(_np(x, "x"), float(x_scale), np.asarray(x_zero_point), float(y_scale),
                                          np.asarray(y_zero_point), rounding, int(out_bits), dyadic_rounding,
                                          int(dyadic_bits), _shift(dyadic_shift))
    return _codes_out(codes, signed, out_bits)


def quantize_multiplier(multiplier: float) -> Tuple[int, int]:
    """TFLite QuantizeMultiplier: ``M ~ q31 * 2^(shift - 31)``."""
    return _core.integer_quantize_multiplier(float(multiplier))


def dyadic_multiplier(multiplier: float, dyadic_bits: int = 31, dyadic_shift: Optional[int] = None) -> Tuple[int, int]:
    """Dyadic ``M ~ b / 2^n``; returns (b, n)."""
    return _core.integer_dyadic_multiplier(float(multiplier), int(dyadic_bits), _shift(dyadic_shift))
