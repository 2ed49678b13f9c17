"""Quantization records: how one tensor and how one layer are quantized.

These frozen records are the spine of pyzeroq (DESIGN.md, "one quantization record"):
calibration (ZeroQ PTQ) and learned-step QAT (LSQ) *produce* them from the quantizers
of :mod:`pyzeroq.quantizers`; the fake-quant forward, the integer compiler
(:mod:`pyzeroq.integer.plan`), the ONNX builder and save / load *consume* them as they
are, without re-deriving scales, codes or the bias.

Formula (onnxruntime QuantizeLinear / DequantizeLinear, one float32 operation each)::

    q    = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)
    real = scale * (q - zero_point)

Unsigned codes: ``[0, 2^bits - 1]`` (uint8 for bits <= 8, uint16 above). Signed codes
(``signed=True``: ``[-2^(bits-1), 2^(bits-1) - 1]``, with ``narrow_range`` dropping the
lowest code as TFLite / TensorRT do; int8 / int16 containers) serve the symmetric-weight
formats of TFLite, TensorRT and onnxruntime S8S8. :class:`CodeFormat` says which layout a
quantizer produces and how it picks its parameters (asymmetric or symmetric).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import ops

__all__ = ["TensorQuant", "LayerQuant", "CodeFormat", "UNSIGNED_ASYMMETRIC",
           "ACTIVATIONS", "RELU6_MAX", "activation_clamp", "bias_scale", "quantize_bias",
           "accumulation_extremes"]

MIN_BITS, MAX_BITS = ops.KERNEL_MIN_BITS, ops.KERNEL_MAX_BITS
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
RELU6_MAX = 6.0
ACTIVATIONS = (None, "relu", "relu6")  # clamps fused into a layer's output requantization


def _frozen_array(value, dtype) -> np.ndarray:
    """A read-only copy with numpy's canonical dtype object (unpickled arrays carry equal,
    non-identical ones)."""
    arr = np.asarray(value).astype(np.dtype(dtype).type)  # astype: a copy, canonical dtype
    arr.setflags(write=False)
    return arr


def _arrays_equal(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@dataclass(frozen=True, eq=False)
class TensorQuant:
    """How one tensor is quantized.

    bits: code width, 2..16.
    scale: float32, shape ``()`` (per tensor) or ``(C,)`` (per channel along ``axis``), > 0.
    zero_point: int32 of the same shape, within ``[qmin, qmax]``.
    axis: None (per tensor) or the channel axis of the tensor (0 for conv / linear weights).
    signed, narrow_range: the code range (see the module docstring).

    Raises ValueError (naming the field) for anything else. Equality is bit-exact.
    """

    bits: int
    scale: np.ndarray
    zero_point: np.ndarray
    axis: Optional[int] = None
    signed: bool = False
    narrow_range: bool = False

    def __post_init__(self):
        if not isinstance(self.bits, numbers.Integral) or isinstance(self.bits, bool) \
                or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
        object.__setattr__(self, "bits", int(self.bits))
        scale = _frozen_array(self.scale, np.float32)
        zp_raw = np.asarray(self.zero_point)
        if zp_raw.dtype.kind == "f" and not np.array_equal(zp_raw, np.round(zp_raw)):
            raise ValueError(f"zero_point must hold integers, got {zp_raw!r}")
        zp = _frozen_array(zp_raw, np.int32)
        if scale.ndim > 1 or zp.shape != scale.shape:
            raise ValueError(f"scale and zero_point must both be scalars or both [C]; got shapes "
                             f"{scale.shape} and {zp.shape}")
        if self.axis is not None and (not isinstance(self.axis, numbers.Integral) or isinstance(self.axis, bool)):
            raise ValueError(f"axis must be None or an int, got {self.axis!r}")
        if self.axis is not None:
            object.__setattr__(self, "axis", int(self.axis))
        if (self.axis is None) != (scale.ndim == 0):
            raise ValueError(f"axis must be None for a per-tensor record and an int for a per-channel one; "
                             f"got axis={self.axis!r} with scale shape {scale.shape}")
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("scale must be finite and > 0")
        if not isinstance(self.signed, bool) or not isinstance(self.narrow_range, bool):
            raise ValueError("signed and narrow_range must be bools")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zp)
        if ((zp < self.qmin) | (zp > self.qmax)).any():
            raise ValueError(f"zero_point must lie in [{self.qmin}, {self.qmax}] for {self.bits}-bit codes")

    # ---------------------------------------------------------------- range
    @property
    def qmin(self) -> int:
        return ops.qrange(self.bits, **self.range_flags)[0]

    @property
    def qmax(self) -> int:
        return ops.qrange(self.bits, **self.range_flags)[1]

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def scale_value(self) -> float:
        """The per-tensor scale as a Python float (exactly the float32 value)."""
        self._require_per_tensor("scale_value")
        return float(self.scale)

    @property
    def zero_point_value(self) -> int:
        self._require_per_tensor("zero_point_value")
        return int(self.zero_point)

    def _require_per_tensor(self, what: str) -> None:
        if self.per_channel:
            raise ValueError(f"{what} is only defined for a per-tensor record (axis=None)")

    def channels(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(scale float32 [n], zero_point int32 [n]): per-tensor values broadcast to n channels."""
        return (np.broadcast_to(self.scale, (n,)).astype(np.float32),
                np.broadcast_to(self.zero_point, (n,)).astype(np.int32))

    # ---------------------------------------------------------------- apply
    @property
    def range_flags(self) -> dict:
        """``signed`` / ``narrow_range`` as the keywords of the :mod:`pyzeroq.ops` kernels."""
        return {"signed": self.signed, "narrow_range": self.narrow_range}

    def quantize(self, x):
        """Codes of ``x`` (numpy or CPU tensor, float) by the formula above (``pyzeroq.ops.quantize``):
        uint8 / uint16, or int8 / int16 for a signed record, within ``[qmin, qmax]``."""
        return ops.quantize(x, self.scale, self.zero_point, self.bits, axis=self.axis, **self.range_flags)

    def dequantize(self, q):
        """float32 ``scale * (q - zero_point)``."""
        return ops.dequantize(q, self.scale, self.zero_point, axis=self.axis)

    def fake_quantize(self, x):
        """``dequantize(quantize(x))`` in one pass, over the record's code range."""
        return ops.fake_quantize(x, self.scale, self.zero_point, self.bits, axis=self.axis, **self.range_flags)

    @property
    def code_dtype(self) -> type:
        """numpy dtype of the codes: uint8 / uint16, or int8 / int16 when signed."""
        return ops.code_dtype(self.bits, signed=self.signed)

    def with_params(self, scale, zero_point) -> "TensorQuant":
        """The same bits, axis and code range with other parameters."""
        return TensorQuant(self.bits, scale, zero_point, self.axis, self.signed, self.narrow_range)

    def code_of(self, value: float) -> int:
        """Code of one real value (per-tensor records)."""
        self._require_per_tensor("code_of")
        return int(self.quantize(np.array([value], np.float32))[0])

    # ---------------------------------------------------------------- io
    def to_dict(self) -> dict:
        """Plain types and numpy arrays only (safe to save with ``torch.save`` / load with weights_only)."""
        return {"bits": self.bits, "scale": self.scale.tolist(), "zero_point": self.zero_point.tolist(),
                "axis": self.axis, "signed": self.signed, "narrow_range": self.narrow_range}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorQuant":
        """The record of :meth:`to_dict`'s dict; ValueError naming the missing keys."""
        missing = [k for k in ("bits", "scale", "zero_point", "axis") if k not in d]
        if missing:
            raise ValueError(f"a TensorQuant dict needs the keys bits, scale, zero_point and axis; missing {missing}")
        return cls(d["bits"], np.asarray(d["scale"], np.float32), np.asarray(d["zero_point"], np.int32),
                   d["axis"], d.get("signed", False), d.get("narrow_range", False))

    def __eq__(self, other) -> bool:
        if not isinstance(other, TensorQuant):
            return NotImplemented
        return (self.bits, self.axis, self.signed, self.narrow_range) == \
            (other.bits, other.axis, other.signed, other.narrow_range) and \
            _arrays_equal(self.scale, other.scale) and _arrays_equal(self.zero_point, other.zero_point)

    def __reduce__(self):  # pickling goes through plain data
        return (TensorQuant.from_dict, (self.to_dict(),))

    def __hash__(self) -> int:
        return hash((self.bits, self.axis, self.signed, self.scale.tobytes(), self.zero_point.tobytes()))

    def __repr__(self) -> str:
        kind = f"per-channel axis={self.axis} [{self.scale.size}]" if self.per_channel else \
            f"scale={float(self.scale):.6g}, zero_point={int(self.zero_point)}"
        return f"TensorQuant(bits={self.bits}, {kind}{', signed' if self.signed else ''})"


@dataclass(frozen=True)
class CodeFormat:
    """The code layout a quantizer produces and how it chooses its parameters.

    signed: codes in ``[-2^(b-1), 2^(b-1) - 1]`` (int8 / int16) instead of ``[0, 2^b - 1]``.
    narrow_range: the lowest code is unused (``[-(2^(b-1) - 1), 2^(b-1) - 1]`` signed), as TFLite
        and TensorRT weights; only with ``symmetric``.
    symmetric: scale from ``max |x|`` and a fixed zero point (0 signed, ``2^(b-1)`` unsigned:
        :func:`pyzeroq.ops.symmetric_params`), else from ``[min, max]`` with a computed zero point
        (:func:`pyzeroq.ops.asymmetric_params`; a signed asymmetric zero point is the unsigned one
        less ``2^(b-1)``, the same scale and real values: only the codes shift).
    """

    signed: bool = False
    narrow_range: bool = False
    symmetric: bool = False

    def __post_init__(self):
        for name in ("signed", "narrow_range", "symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.narrow_range and not self.symmetric:
            raise ValueError("narrow_range needs symmetric=True (asymmetric ranges use every code)")

    @property
    def range_flags(self) -> dict:
        """``signed`` / ``narrow_range`` as the keywords of the :mod:`pyzeroq.ops` kernels."""
        return {"signed": self.signed, "narrow_range": self.narrow_range}

    def zero_point(self, bits: int) -> int:
        """The fixed zero point of the symmetric format (0 signed, 2^(bits-1) unsigned)."""
        return 0 if self.signed else 1 << (bits - 1)

    def params(self, x, bits: int, axis: Optional[int] = None, percentile: Optional[float] = None):
        """(float32 scale, int32 zero point) of ``x`` for ``bits``-bit codes of this format."""
        if self.symmetric:
            return ops.symmetric_params(x, bits, axis, percentile, **self.range_flags)
        scale, zp = ops.asymmetric_params(x, bits, axis, percentile)
        return (scale, zp - (1 << (bits - 1))) if self.signed else (scale, zp)

    def record(self, bits: int, scale, zero_point, axis: Optional[int] = None) -> "TensorQuant":
        return TensorQuant(bits, scale, zero_point, axis, self.signed, self.narrow_range)

    def to_dict(self) -> dict:
        return {"signed": self.signed, "narrow_range": self.narrow_range, "symmetric": self.symmetric}


UNSIGNED_ASYMMETRIC = CodeFormat()  # pyzeroq's default: uint8 codes, per-channel zero points


def activation_clamp(q: TensorQuant, activation: Optional[str]) -> tuple[int, int]:
    """(lo, hi) codes of the per-tensor output record ``q`` after a fused ``activation``:
    None keeps ``[qmin, qmax]``; "relu" clamps at the zero point (the code of 0.0); "relu6"
    also at the code of 6.0. Exact, as quantization is monotone."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    lo = q.zero_point_value if activation is not None else q.qmin
    hi = min(q.code_of(RELU6_MAX), q.qmax) if activation == "relu6" else q.qmax
    return max(lo, q.qmin), hi


def accumulation_extremes(centered_weight_codes: np.ndarray, input_q: TensorQuant) -> tuple[np.ndarray, np.ndarray]:
    """int64 [C]: the largest positive sum and the largest negative sum (as a magnitude) of
    ``sum_k (x_k - z_x) * (w_k - z_w)`` that any input codes ``x_k`` of ``input_q`` can give, per
    output channel; ``centered_weight_codes``: int [C, K], the codes less their zero point."""
    w = np.asarray(centered_weight_codes, np.int64)
    above = input_q.qmax - input_q.zero_point_value  # x - z_x reaches [-below, above]
    below = input_q.zero_point_value - input_q.qmin
    plus, minus = np.where(w > 0, w, 0).sum(1), np.where(w < 0, -w, 0).sum(1)
    return plus * above + minus * below, plus * below + minus * above


def bias_scale(input_q: TensorQuant, weight_q: TensorQuant, channels: int) -> np.ndarray:
    """float32 [channels]: ``f32(input_scale * weight_scale[c])``, the scale of the int32 bias."""
    w_scale, _ = weight_q.channels(channels)
    return (np.float32(input_q.scale_value) * w_scale).astype(np.float32)


def quantize_bias(bias: np.ndarray, input_q: TensorQuant, weight_q: TensorQuant) -> np.ndarray:
    """int32 ``clamp(rne(b / f32(input_scale * weight_scale[c])), INT32)`` (float32 division)."""
    b = np.asarray(bias, np.float32).reshape(-1)
    codes = np.rint(b / bias_scale(input_q, weight_q, b.size))
    return np.clip(codes.astype(np.float64), INT32_MIN, INT32_MAX).astype(np.int32)


@dataclass(frozen=True, eq=False)
class LayerQuant:
    """How one conv / linear layer is quantized.

    name: the layer's module name.
    weight: per-output-channel (axis 0) or per-tensor record of the weight.
    weight_codes: the weight's codes, the layer's weight shape (uint8 / uint16), ``weight.quantize(w)``.
    input: per-tensor record of the layer's input activation.
    output: per-tensor record of its (requantized) output, or None for a float output (logits).
    bias: int32 [out_channels] at scale ``f32(input.scale * weight.scale[c])``, or None.
    activation: clamp fused into the output requantization: None, "relu" (clamp at the
        output zero point) or "relu6" (also at the code of 6.0; exact as quantization is monotone).
    """

    name: str
    weight: TensorQuant
    weight_codes: np.ndarray
    input: TensorQuant
    output: Optional[TensorQuant] = None
    bias: Optional[np.ndarray] = None
    activation: Optional[str] = None

    def __post_init__(self):
        if self.input.per_channel or (self.output is not None and self.output.per_channel):
            raise ValueError(f"layer {self.name!r}: input and output records must be per tensor")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        codes = _frozen_array(self.weight_codes, self.weight_codes.dtype)
        if codes.dtype.kind not in "ui" or codes.ndim < 2:
            raise ValueError(f"layer {self.name!r}: weight_codes must be integer [O, ...], got {codes.dtype} {codes.shape}")
        object.__setattr__(self, "weight_codes", codes)
        if self.bias is not None:
            bias = _frozen_array(self.bias, np.int32)
            if bias.shape != (codes.shape[0],):
                raise ValueError(f"layer {self.name!r}: bias must be int32 [{codes.shape[0]}], got {bias.shape}")
            object.__setattr__(self, "bias", bias)

    @property
    def out_channels(self) -> int:
        return int(self.weight_codes.shape[0])

    @property
    def bias_scale(self) -> np.ndarray:
        """float32 [out_channels] ``f32(input.scale * weight.scale[c])``."""
        return bias_scale(self.input, self.weight, self.out_channels)

    def clamp_codes(self) -> tuple[int, int]:
        """(lo, hi) output codes after the fused activation (the full code range without one)."""
        if self.output is None:
            raise ValueError(f"layer {self.name!r} has a float output")
        return activation_clamp(self.output, self.activation)

    def to_dict(self) -> dict:
        return {"name": self.name, "weight": self.weight.to_dict(), "weight_codes": self.weight_codes.copy(),
                "input": self.input.to_dict(), "output": None if self.output is None else self.output.to_dict(),
                "bias": None if self.bias is None else self.bias.copy(), "activation": self.activation}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerQuant":
        out = d.get("output")
        return cls(d["name"], TensorQuant.from_dict(d["weight"]), np.asarray(d["weight_codes"]),
                   TensorQuant.from_dict(d["input"]), None if out is None else TensorQuant.from_dict(out),
                   None if d.get("bias") is None else np.asarray(d["bias"], np.int32), d.get("activation"))

    def __eq__(self, other) -> bool:
        if not isinstance(other, LayerQuant):
            return NotImplemented
        return (self.name, self.weight, self.input, self.output, self.activation) == \
            (other.name, other.weight, other.input, other.output, other.activation) and \
            _arrays_equal(self.weight_codes, other.weight_codes) and _arrays_equal(self.bias, other.bias)

    def __reduce__(self):
        return (LayerQuant.from_dict, (self.to_dict(),))

    __hash__ = None
