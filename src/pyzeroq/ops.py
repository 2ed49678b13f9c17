"""Uniform affine quantization kernels, unsigned and signed codes (C++ underneath, ``pyzeroq._core``).

Conventions (DESIGN.md)::

    q    = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)   # one float32 division
    real = scale * (q - zero_point)                                     # one float32 multiply

Code ranges (:func:`qrange`) and storage (:func:`code_dtype`):

* unsigned (default): ``[0, 2**bits - 1]``; bits 2..8 -> uint8, 9..16 -> uint16.
* ``signed=True``: ``[-2**(bits-1), 2**(bits-1) - 1]``; bits 2..8 -> int8, 9..16 -> int16
  (onnxruntime S8 / TFLite int8 / TensorRT codes).
* ``narrow_range=True`` raises ``qmin`` by one (signed 8 bit: ``[-127, 127]``, the symmetric
  weight range of TFLite and TensorRT; unsigned: ``[1, 2**bits - 1]``).

Inputs are numpy arrays or CPU torch tensors; the result is of the same kind (torch in ->
torch out; a tensor that requires grad is detached — use :func:`fake_quantize_ste` for
gradients). ``scale`` / ``zero_point`` may be Python scalars, numpy arrays or tensors:

* ``axis=None`` (per tensor): one scale and one zero point (any shape holding one value).
* ``axis=k`` (per channel along ``x``'s axis ``k``, negative allowed): ``C = x.shape[k]``
  values each (any shape holding C values, e.g. ``[C]`` or ``[C, 1, 1, 1]``), or one value
  shared by all channels.

Data are float32 internally: C-contiguous native float32 input is used in place (no copy);
other floating dtypes, non-contiguous or big-endian arrays are converted first. Every
invalid argument (NaN/Inf in data or scale, scale <= 0, bits outside 2..16, zero point
outside [qmin, qmax] or not an integer, axis out of range, parameter count not matching
the axis length, non-float data, ``signed`` / ``narrow_range`` not a bool, and, for the
kernels taking ``bits``, a grid ``scale * (code - zero_point)`` whose end codes overflow
float32) raises ValueError/TypeError from the C++ binding, naming the argument. Empty arrays are valid and
give empty results.
"""

from __future__ import annotations

import numbers
import sys
from typing import Any

import numpy as np

from pyzeroq import _core

__all__ = [
    "quantize",
    "dequantize",
    "fake_quantize",
    "asymmetric_params",
    "symmetric_params",
    "fake_quantize_ste",
    "code_dtype",
    "qrange",
]

_UINT8_MAX_BITS = 8
KERNEL_MIN_BITS, KERNEL_MAX_BITS = _core.MIN_BITS, _core.MAX_BITS  # the code widths the C++ kernels take


def code_dtype(bits: int, signed: bool = False) -> type:
    """Storage dtype of ``bits``-bit codes: ``np.uint8`` for bits <= 8, else ``np.uint16``
    (``np.int8`` / ``np.int16`` when ``signed``); ``bits`` / ``signed`` checked as in :func:`qrange`."""
    qrange(bits, signed)
    if signed:
        return np.int8 if bits <= _UINT8_MAX_BITS else np.int16
    return np.uint8 if bits <= _UINT8_MAX_BITS else np.uint16


def qrange(bits: int, signed: bool = False, narrow_range: bool = False) -> tuple[int, int]:
    """Code range ``(qmin, qmax)`` of ``bits``-bit codes: unsigned ``(0, 2**bits - 1)``, signed
    ``(-2**(bits-1), 2**(bits-1) - 1)``; ``narrow_range`` adds 1 to ``qmin``. ValueError for
    ``bits`` outside the kernels' ``KERNEL_MIN_BITS..KERNEL_MAX_BITS`` (or not an int),
    TypeError for flags that are not bools."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or \
            not KERNEL_MIN_BITS <= bits <= KERNEL_MAX_BITS:
        raise ValueError(f"bits must be in {KERNEL_MIN_BITS}..{KERNEL_MAX_BITS}, got {bits!r}")
    for name, flag in (("signed", signed), ("narrow_range", narrow_range)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if signed:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        lo, hi = 0, (1 << bits) - 1
    return lo + (1 if narrow_range else 0), hi


def _torch():
    # torch is only looked up if already imported: a tensor argument implies it is.
    return sys.modules.get("torch")


def _param(p: Any, name: str) -> Any:
    """scale / zero_point as something the binding reads (tensors -> numpy, bfloat16 as float32)."""
    torch = _torch()
    if torch is not None and isinstance(p, torch.Tensor):
        if p.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor: it holds no values")
        return _host(p.cpu())
    return p


def _host(t) -> np.ndarray:
    """numpy view of the CPU tensor ``t``; bfloat16 (which numpy lacks) as its exact float32 values."""
    t = t.detach()
    return (t.float() if t.dtype == _torch().bfloat16 else t).numpy()


def _data(x: Any, name: str = "x") -> tuple[Any, bool]:
    """(numpy view of x, was_torch). Non-CPU tensors are rejected here (CPU kernels)."""
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor, got device {x.device}")
        return _host(x), True
    return x, False


def _out_array(out) -> np.ndarray:
    """The numpy view the kernel writes of the CPU tensor ``out`` (TypeError / ValueError naming it)."""
    if out.device.type != "cpu" or out.dtype != _torch().float32:
        raise TypeError(f"out must be a float32 CPU tensor, got {out.dtype} on {out.device}")
    if out.requires_grad:
        raise ValueError("out must not require grad: the kernel writes it outside autograd")
    return out.numpy()


def quantize(x, scale, zero_point, bits: int, axis: int | None = None, *, signed: bool = False,
             narrow_range: bool = False):
    """Integer codes ``clamp(rne(x / scale) + zero_point, qmin, qmax)``, ``(qmin, qmax) =
    qrange(bits, signed, narrow_range)``, of dtype ``code_dtype(bits, signed)`` (uint8 / uint16,
    or int8 / int16 when ``signed``) and x's shape. The zero point must lie in ``[qmin, qmax]``."""
    data, is_torch = _data(x)
    q = _core.quantize(data, _param(scale, "scale"), _param(zero_point, "zero_point"), bits, axis, signed=signed,
                       narrow_range=narrow_range)
    return _torch().from_numpy(q) if is_torch else q


def dequantize(q, scale, zero_point, axis: int | None = None):
    """float32 ``scale * (q - zero_point)`` of q's shape; ``q`` holds uint8, uint16, int8 or int16
    codes (other dtypes: TypeError), the zero point any value of that dtype."""
    data, is_torch = _data(q, "q")
    y = _core.dequantize(data, _param(scale, "scale"), _param(zero_point, "zero_point"), axis)
    return _torch().from_numpy(y) if is_torch else y


def fake_quantize(x, scale, zero_point, bits: int, axis: int | None = None, *, signed: bool = False,
                  narrow_range: bool = False, out=None):
    """float32 ``dequantize(quantize(x))`` in one pass (non-CPU tensors: pure-torch formula, the same
    checks of the parameters, none of the data); ``signed`` / ``narrow_range`` choose the code
    range as in :func:`quantize`.

    ``out``: optional preallocated C-contiguous float32 array (or CPU tensor) of x's shape,
    not overlapping x, that receives the result (saves the allocation on repeated calls).
    """
    torch = _torch()
    flags = {"signed": signed, "narrow_range": narrow_range}
    if torch is not None and isinstance(x, torch.Tensor):
        if out is not None and not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch tensor like x, got {type(out).__name__}")
        s, z = _param(scale, "scale"), _param(zero_point, "zero_point")
        if x.device.type != "cpu":
            _check_params(x, s, z, bits, axis, flags)
            with torch.no_grad():
                y = _fake_quantize_torch(x, s, z, bits, axis, dtype=torch.float32, **flags)
            return y if out is None else out.copy_(y)
        y = _core.fake_quantize(_host(x), s, z, bits, axis, **flags, out=None if out is None else _out_array(out))
        return torch.from_numpy(y) if out is None else out
    return _core.fake_quantize(x, _param(scale, "scale"), _param(zero_point, "zero_point"), bits, axis, **flags,
                               out=out)


def asymmetric_params(x, bits: int, axis: int | None = None, percentile: float | None = None):
    """Asymmetric ``(scale, zero_point)`` for ``bits``-bit codes from the range of ``x``.

    Range: ``[min, max]`` of the values (per channel along ``axis`` when given), or with
    ``percentile=p`` (50 <= p <= 100) the clipping range ``[P(100 - p), P(p)]`` where ``P`` is
    ``numpy.percentile(values, ., method="linear")`` on the values as float64 (e.g. p=99.99
    drops the 0.01 % extreme values at each end). The range is then widened to hold 0
    (``min <= 0 <= max``) and::

        scale      = float32((max - min) / (2**bits - 1))   # computed in float64
        zero_point = clamp(rne(-min / scale), 0, 2**bits - 1)

    A channel whose range is [0, 0] (all zeros, or no elements) gets scale 1.0, zero point 0.

    Returns float32 ``scale`` and int32 ``zero_point`` arrays, 0-d for ``axis=None`` and of
    shape ``[C]`` otherwise (torch tensors for a torch input).
    """
    data, is_torch = _data(x)
    scale, zp = _core.asymmetric_params(data, bits, axis, percentile)
    return _params_out(scale, zp, is_torch)


def symmetric_params(x, bits: int, axis: int | None = None, percentile: float | None = None, *,
                     signed: bool = True, narrow_range: bool = False):
    """Symmetric ``(scale, zero_point)`` for ``bits``-bit codes from the magnitude of ``x``.

    ``amax = max |x|`` (per channel along ``axis`` when given), or with ``percentile=p``
    (50 <= p <= 100) ``amax = P(p)`` of the magnitudes ``|x|``, ``P`` being
    ``numpy.percentile(abs(values), p, method="linear")`` on float64 (p=100 is max |x|). Then::

        scale      = float32(amax / (2**(bits-1) - 1))     # computed in float64; 127 for 8 bits
        zero_point = 0 if signed else 2**(bits-1)          # 128 for unsigned 8 bits

    The divisor is ``2**(bits-1) - 1`` for full and narrow range alike (TFLite / TensorRT's
    symmetric rule, onnxruntime's U8 symmetric for ``signed=False``), so ``+-amax`` map to
    ``+-(2**(bits-1) - 1)`` around the zero point; ``narrow_range`` only describes the codes the
    caller will use and does not change the result (it is validated as a bool). A channel with
    ``amax == 0`` (all zeros, or no elements), or whose scale underflows float32, gets scale 1.0
    and the same zero point (as :func:`asymmetric_params` gives degenerate channels scale 1.0).

    Returns float32 ``scale`` and int32 ``zero_point`` arrays, 0-d for ``axis=None`` and of
    shape ``[C]`` otherwise (torch tensors for a torch input). Errors as :func:`asymmetric_params`.
    """
    data, is_torch = _data(x)
    scale, zp = _core.symmetric_params(data, bits, axis, percentile, signed=signed, narrow_range=narrow_range)
    return _params_out(scale, zp, is_torch)


def _params_out(scale, zp, is_torch: bool):
    if is_torch:
        torch = _torch()
        return torch.from_numpy(scale), torch.from_numpy(zp)
    return scale, zp


# ------------------------------------------------------------------ straight-through estimator


def _broadcast_shape(x, axis: int | None) -> tuple[int, ...] | None:
    if axis is None:
        return None
    ndim = x.dim()
    shape = [1] * ndim
    shape[axis % ndim if ndim else 0] = -1
    return tuple(shape)


def _torch_params(x, scale, zero_point, axis: int | None):
    """float32 (scale, zero_point) tensors on x's device, shaped to broadcast along ``axis``."""
    import torch

    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    z = torch.as_tensor(zero_point, device=x.device).to(torch.float32)
    shape = _broadcast_shape(x, axis)
    if shape is not None:
        return (s.reshape(-1).reshape(shape) if s.numel() > 1 else s.reshape(()),
                z.reshape(-1).reshape(shape) if z.numel() > 1 else z.reshape(()))
    return s.reshape(()), z.reshape(())


def _check_params(x, scale, zero_point, bits: int, axis: int | None, flags: dict) -> None:
    """The C++ kernel's checks of ``scale`` / ``zero_point`` / ``bits`` / ``axis`` (TypeError /
    ValueError naming them) for a non-CPU ``x``: the kernel runs on a float32 stand-in of one
    element per channel, so nothing of ``x`` moves to the host. (scale / zero_point as numpy.)"""
    shape = [1] * x.dim()
    if axis is not None and -x.dim() <= axis < x.dim():
        shape[axis] = x.shape[axis]
    _core.fake_quantize(np.zeros(shape, np.float32), scale, zero_point, bits, axis, **flags)


def _fake_quantize_torch(x, scale, zero_point, bits: int, axis: int | None = None, signed: bool = False,
                         narrow_range: bool = False, dtype=None):
    """Pure-torch equivalent of :func:`fake_quantize` (for non-CPU tensors; no data validation),
    returned in ``dtype`` (default: x's).

    ``scale * clamp(round(x / scale), qmin - zp, qmax - zp)``: clamping the rounded offset equals
    clamping the code (integer bounds), torch.round is half-to-even; bit-exact to the kernel
    on finite float32 data (tested).
    """
    import torch

    qmin, qmax = qrange(bits, signed, narrow_range)
    s, z = _torch_params(x, scale, zero_point, axis)
    xf = x.to(torch.float32)
    offset = torch.round(xf / s)
    offset = torch.minimum(torch.maximum(offset, qmin - z), qmax - z)
    return (offset * s).to(x.dtype if dtype is None else dtype)


def _ste_mask_torch(x, scale, zero_point, bits: int, axis: int | None, signed: bool = False,
                    narrow_range: bool = False):
    import torch

    qmin, qmax = qrange(bits, signed, narrow_range)
    s, z = _torch_params(x, scale, zero_point, axis)
    lo = s * (qmin - z)
    hi = s * (qmax - z)
    xf = x.to(torch.float32)
    return (xf >= lo) & (xf <= hi)


_STE = None


def _ste_function():
    global _STE
    if _STE is None:
        import torch

        class FakeQuantizeSTE(torch.autograd.Function):
            """Fake quantization; backward passes the gradient where
            ``scale*(qmin-zp) <= x <= scale*(qmax-zp)`` and zeroes it elsewhere.
            No gradient flows to scale or zero_point."""

            @staticmethod
            def forward(ctx, x, scale, zero_point, bits, axis, signed, narrow_range):
                s, z = _param(scale, "scale"), _param(zero_point, "zero_point")
                flags = {"signed": signed, "narrow_range": narrow_range}
                ctx.save_for_backward(x)
                ctx.quant = (s, z, bits, axis, flags)
                if x.device.type != "cpu":
                    _check_params(x, s, z, bits, axis, flags)
                    return _fake_quantize_torch(x, s, z, bits, axis, **flags)
                y = torch.from_numpy(_core.fake_quantize(_host(x), s, z, bits, axis, **flags))
                return y if x.dtype == torch.float32 else y.to(x.dtype)

            @staticmethod
            def backward(ctx, grad):
                (x,) = ctx.saved_tensors
                s, z, bits, axis, flags = ctx.quant
                if (x.device.type != "cpu" or x.dtype != torch.float32 or grad.dtype != torch.float32
                        or not grad.is_contiguous()):  # e.g. expanded grads: let torch broadcast
                    dx = grad * _ste_mask_torch(x, s, z, bits, axis, **flags).to(grad.dtype)
                else:
                    dx = torch.from_numpy(_core.ste_grad(grad.numpy(), x.detach().numpy(), s, z, bits, axis, **flags))
                return dx, None, None, None, None, None, None

        _STE = FakeQuantizeSTE
    return _STE


def fake_quantize_ste(x, scale, zero_point, bits: int, axis: int | None = None, *, signed: bool = False,
                      narrow_range: bool = False):
    """Fake quantization of a tensor with a straight-through-estimator gradient (for QAT).

    Forward: :func:`fake_quantize` (the C++ kernel on CPU, :func:`_fake_quantize_torch`
    elsewhere); the output has x's dtype. Backward: ``grad`` where
    ``scale * (qmin - zp) <= x <= scale * (qmax - zp)`` (closed range, float32 products,
    ``(qmin, qmax) = qrange(bits, signed, narrow_range)``), 0 outside. ``scale`` /
    ``zero_point`` get no gradient.
    """
    torch = _torch()
    if torch is None or not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch tensor (fake_quantize_ste is for autograd; fake_quantize takes "
                        f"numpy arrays), got {type(x).__name__}")
    return (_STE or _ste_function()).apply(x, scale, zero_point, bits, axis, signed, narrow_range)
