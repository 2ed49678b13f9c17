"""Signed (int8) codes on the unsigned integer kernels, by an exact offset shift.

The C++ simulator kernels take uint8 codes. An int8 tensor ``x`` with zero point ``zx`` is
the uint8 tensor ``x + 128`` with zero point ``zx + 128``: every kernel reads its inputs only as

* differences ``x - zx`` (conv / matmul products, the padding that holds the zero point,
  qadd / qmul operands, global average pool's sum), unchanged by the shift;
* a maximum (max_pool2d), which commutes with adding a constant;
* avg_pool2d's ``round(sum / count)`` of the codes: the shifted sum is ``sum + 128 * count``,
  so the quotient moves by exactly 128, an even integer, and both tie rules (``half_up`` =
  floor(v + 1/2) and ``half_even``) commute with adding an even integer.

A signed output of ``out_bits`` bits (range ``[-2^(b-1), 2^(b-1) - 1]``) is computed as the
unsigned output with zero point ``zy + 2^(b-1)``, whose clamp range ``[0, 2^b - 1]`` is the
signed range shifted by ``2^(b-1)``; every requantizer adds the zero point after rounding and
clamps after adding it (``relu`` clamps at the zero point), so subtracting ``2^(b-1)`` again gives
the signed result exactly. int8 (out_bits <= 8) / int16 storage.

Which output is signed (ONNX rule: the type of ``y_zero_point`` decides the output type):
``y_signed=True``/``False`` explicitly, or with ``y_signed=None`` signed exactly when
``y_zero_point`` is a numpy (or torch) int8 / int16 value or array.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

__all__ = ["INT8_OFFSET", "unsigned_input", "output_is_signed", "unsigned_output_zero_point", "signed_output",
           "signed_like_input"]

INT8_OFFSET = 128  # int8 code v <-> uint8 code v + 128 (two's complement: flip the top bit)
_TOP_BIT_8 = np.uint8(0x80)
_INT8_MIN, _INT8_MAX = -128, 127
_SIGNED_ZERO_POINT_DTYPES = (np.dtype(np.int8), np.dtype(np.int16))
_MAX_UINT8_OUT_BITS = 8


def _as_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # torch tensor
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple, int, np.integer)):
        return np.asarray(x)
    raise TypeError(f"{name} must be a numpy array or a CPU torch tensor, got {type(x).__name__}")


def _integer_array(value, name: str) -> np.ndarray:
    arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array or scalar, got dtype {arr.dtype}")
    return arr


def unsigned_input(codes, zero_point, name: str) -> Tuple[np.ndarray, object, bool]:
    """(uint8 codes, zero point, was_signed) for the kernels: uint8 ``codes`` pass unchanged;
    int8 ``codes`` become ``codes + 128`` (uint8) with zero point ``zero_point + 128``.

    ``codes``: numpy array or CPU tensor of dtype uint8 or int8 (else TypeError naming ``name``);
    ``zero_point``: integers, within [-128, 127] for int8 codes (else ValueError naming
    ``<name>_zero_point``; uint8 ranges are checked by the kernels).
    """
    arr = _as_numpy(codes, name)
    if arr.dtype == np.uint8:
        return arr, zero_point, False
    if arr.dtype != np.int8:
        raise TypeError(f"{name} must have dtype uint8 or int8, got {arr.dtype}")
    zp_name = f"{name}_zero_point"
    zp = _integer_array(zero_point, zp_name).astype(np.int64)
    if zp.size and (zp.min() < _INT8_MIN or zp.max() > _INT8_MAX):
        raise ValueError(f"{zp_name} must lie in [{_INT8_MIN}, {_INT8_MAX}] for int8 {name}, got {zp.tolist()}")
    return np.bitwise_xor(arr.view(np.uint8), _TOP_BIT_8), zp + INT8_OFFSET, True


def output_is_signed(y_signed: Optional[bool], y_zero_point) -> bool:
    """True for a signed output: ``y_signed`` when given (a bool), else whether ``y_zero_point``
    is an int8 / int16 numpy value, array or tensor (the ONNX rule)."""
    if y_signed is not None:
        if not isinstance(y_signed, (bool, np.bool_)):
            raise TypeError(f"y_signed must be a bool or None, got {type(y_signed).__name__}")
        return bool(y_signed)
    if hasattr(y_zero_point, "detach"):  # torch tensor
        return y_zero_point.detach().cpu().numpy().dtype in _SIGNED_ZERO_POINT_DTYPES
    if isinstance(y_zero_point, (np.ndarray, np.generic)):
        return y_zero_point.dtype in _SIGNED_ZERO_POINT_DTYPES
    return False  # Python ints, lists: unsigned unless y_signed says otherwise


_MIN_OUT_BITS, _MAX_OUT_BITS = 2, 16


def _half_range(out_bits: int) -> int:
    if not _MIN_OUT_BITS <= int(out_bits) <= _MAX_OUT_BITS:
        raise ValueError(f"out_bits must lie in [{_MIN_OUT_BITS}, {_MAX_OUT_BITS}], got {out_bits}")
    return 1 << (int(out_bits) - 1)


def unsigned_output_zero_point(y_zero_point, out_bits: int, signed: bool, name: str = "y_zero_point"):
    """The zero point the unsigned kernel gets: unchanged when not ``signed``, else
    ``y_zero_point + 2^(out_bits-1)`` after checking it lies in the signed range (ValueError)."""
    if not signed:
        return y_zero_point
    zp = _integer_array(y_zero_point, name).astype(np.int64)
    half = _half_range(out_bits)
    if zp.size and (zp.min() < -half or zp.max() > half - 1):
        raise ValueError(f"{name} must lie in [{-half}, {half - 1}] for signed {out_bits}-bit output, "
                         f"got {zp.tolist()}")
    return zp + half


def signed_output(codes: np.ndarray, out_bits: int) -> np.ndarray:
    """Unsigned kernel output (uint8 / uint16) shifted back by ``2^(out_bits-1)``: int8 for
    out_bits <= 8, else int16."""
    dtype = np.int8 if out_bits <= _MAX_UINT8_OUT_BITS else np.int16
    return (codes.astype(np.int32) - _half_range(out_bits)).astype(dtype)


def signed_like_input(codes: np.ndarray, was_signed: bool) -> np.ndarray:
    """uint8 output of a kernel whose output shares the input's zero point (pooling): back to
    int8 (``codes - 128``) when the input was int8."""
    return np.bitwise_xor(codes, _TOP_BIT_8).view(np.int8) if was_signed else codes
