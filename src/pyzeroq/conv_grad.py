"""Input gradient of a strided 2-D convolution with few input channels, by polyphase decomposition.

The first layer of an ImageNet network (3 input channels, 7x7, stride 2) has the slowest input
gradient of the whole backward pass on CPU: torch's oneDNN backward-data kernel takes ~5x its
forward time there (ResNet-18 at 224, batch 8, one thread: 43 ms vs 8 ms; every other layer
~1x). Distillation needs exactly that gradient (the images are the parameters), so
:func:`polyphase_input_grad` computes it with one *forward* convolution instead.

For stride ``s``, padding ``p`` and kernel size ``k`` (per axis), input row ``i = s a + r``
(phase ``r`` in [0, s)) receives from output row ``a + t`` through tap ``k_y = r + p - s t``::

    dL/dx[c, s a + r] = sum_{o, t} w[o, c, r + p - s t] * dL/dy[o, a + t]

a stride-1 correlation of ``dL/dy`` with a [C_in s^2, C_out, U, U] kernel (taps that fall
outside the kernel are zero); ``pixel_shuffle(s)`` interleaves the ``s^2`` phases back into
the input grid. Same values as ``torch.ops.aten.convolution_backward`` up to float summation
order. :class:`FastStemGrad` (a ``TorchFunctionMode``) routes qualifying ``conv2d`` calls
through it; every other call runs unchanged.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["polyphase_weight", "polyphase_input_grad", "FastStemGrad", "StepStemGrad", "MAX_POLYPHASE_IN_CHANNELS"]

MAX_POLYPHASE_IN_CHANNELS = 4  # oneDNN's backward-data is only slow with a handful of input channels
CONV2D_DIMS = 4


def _taps(kernel: int, stride: int, padding: int, phase: int) -> list[tuple[int, int]]:
    """(t, k) pairs: output offset t and kernel tap k = phase + padding - stride t inside [0, kernel)."""
    lo = math.ceil((phase + padding - (kernel - 1)) / stride)
    hi = (phase + padding) // stride
    return [(t, phase + padding - stride * t) for t in range(lo, hi + 1)]


def _axis(kernel: int, stride: int, padding: int) -> tuple[list[list[tuple[int, int]]], int, int]:
    """Per phase its taps, the smallest offset T0 and the polyphase kernel size U along one axis."""
    taps = [_taps(kernel, stride, padding, r) for r in range(stride)]
    offsets = [t for phase in taps for t, _ in phase]
    return taps, min(offsets), max(offsets) - min(offsets) + 1


def polyphase_weight(weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int]):
    """The [C_in sy sx, C_out, Uy, Ux] correlation kernel of the input gradient (module docstring)
    of ``weight`` [C_out, C_in, ky, kx], and the smallest output offsets (T0y, T0x)."""
    c_out, c_in, ky, kx = weight.shape
    (sy, sx), (py, px) = stride, padding
    taps_y, t0y, uy = _axis(ky, sy, py)
    taps_x, t0x, ux = _axis(kx, sx, px)
    out = weight.new_zeros(c_in, sy, sx, c_out, uy, ux)
    w = weight.transpose(0, 1)  # [C_in, C_out, ky, kx]
    for ry in range(sy):
        for ty, tap_y in taps_y[ry]:
            for rx in range(sx):
                for tx, tap_x in taps_x[rx]:
                    out[:, ry, rx, :, ty - t0y, tx - t0x] = w[:, :, tap_y, tap_x]
    return out.reshape(c_in * sy * sx, c_out, uy, ux), (t0y, t0x)


def _crop_offsets(t0: int, u: int, out_len: int, phases: int) -> tuple[int, int]:
    """Symmetric padding P of the correlation and the first row b0 of phase row 0 in its output:
    row a of the result reads dL/dy rows a + T0 ... a + T0 + U - 1 (zero outside)."""
    pad = max(-t0, phases - out_len + u - 1 + t0, 0)
    return pad, t0 + pad


def polyphase_input_grad(grad_output: torch.Tensor, weight: torch.Tensor, input_size: tuple[int, int],
                         stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """dL/dx [N, C_in, H, W] of ``y = conv2d(x, weight, stride=stride, padding=padding)`` (groups 1,
    dilation 1) from ``grad_output`` [N, C_out, Ho, Wo]: one stride-1 ``conv2d`` and a
    ``pixel_shuffle`` (module docstring). ``input_size``: (H, W). Float dtypes only."""
    (sy, sx), (h, w) = stride, input_size
    kernel, (t0y, t0x) = polyphase_weight(weight, stride, padding)
    ay, ax = math.ceil(h / sy), math.ceil(w / sx)
    pad_y, b0y = _crop_offsets(t0y, kernel.shape[2], grad_output.shape[2], ay)
    pad_x, b0x = _crop_offsets(t0x, kernel.shape[3], grad_output.shape[3], ax)
    phases = F.conv2d(grad_output, kernel, padding=(pad_y, pad_x))[:, :, b0y:b0y + ay, b0x:b0x + ax]
    if sy == sx:
        full = F.pixel_shuffle(phases, sy)
    else:  # pixel_shuffle needs one factor: interleave by hand
        n, c = phases.shape[0], weight.shape[1]
        full = phases.reshape(n, c, sy, sx, ay, ax).permute(0, 1, 4, 2, 5, 3).reshape(n, c, ay * sy, ax * sx)
    return full[:, :, :h, :w]


def _pair(v) -> tuple[int, int] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(e, int) for e in v):
        return tuple(v)
    return None  # "same" / "valid" strings and anything else: not handled here


class _StemConv(torch.autograd.Function):
    """``conv2d`` whose input gradient is :func:`polyphase_input_grad` (weight, bias: no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(weight)
        ctx.geometry = (tuple(x.shape[2:]), stride, padding)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        size, stride, padding = ctx.geometry
        return polyphase_input_grad(grad, weight, size, stride, padding), None, None, None, None


def _conv2d_args(args, kwargs) -> tuple | None:
    """(x, weight, bias, stride, padding) of a ``conv2d`` call this module handles, else None."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, args)) | kwargs
    x, weight, bias = bound.get("input"), bound.get("weight"), bound.get("bias")
    stride, padding = _pair(bound.get("stride", 1)), _pair(bound.get("padding", 0))
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)) or stride is None or padding is None:
        return None
    plain = bound.get("groups", 1) == 1 and _pair(bound.get("dilation", 1)) == (1, 1)
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if (plain and frozen and x.requires_grad and x.dim() == CONV2D_DIMS and x.device.type == "cpu"
            and x.is_floating_point() and max(stride) > 1 and x.shape[1] <= MAX_POLYPHASE_IN_CHANNELS
            and torch.is_grad_enabled()):
        return x, weight, bias, stride, padding
    return None


class FastStemGrad(TorchFunctionMode):
    """Inside ``with FastStemGrad():`` every CPU ``conv2d`` with a strided kernel, at most
    ``MAX_POLYPHASE_IN_CHANNELS`` input channels, groups 1, dilation 1, an input that needs its
    gradient and a weight / bias that do not (distillation's first layer) computes its input
    gradient by :func:`polyphase_input_grad`; the forward result is ``conv2d``'s own. Every
    other call (and every call outside the block) runs unchanged. ``routed``: how many calls it
    has routed so far."""

    def __init__(self):
        super().__init__()
        self.routed = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:  # the same object as torch.conv2d
            handled = _conv2d_args(args, kwargs)
            if handled is not None:
                self.routed += 1
                return _StemConv.apply(*handled)
        return func(*args, **kwargs)


class StepStemGrad:
    """:class:`FastStemGrad` for the steps of an optimization loop that all make the same calls:
    ``with stem_grad.step():`` around each step's forward pass. When the first step routed no
    call (no qualifying stem, e.g. ResNet-20's stride-1 one), the later steps run without the
    mode, which would only add a Python call to every torch function of the forward pass."""

    def __init__(self):
        self._first: FastStemGrad | None = None

    def step(self):
        if self._first is None:
            self._first = FastStemGrad()
            return self._first
        return FastStemGrad() if self._first.routed else contextlib.nullcontext()
