"""LSQ (Esser et al. 2020, "Learned Step Size Quantization") fake quantization.

Asymmetric grid with the project's conventions: codes ``q = clamp(rne(x / s) + z, 0, Qmax)``,
``Qmax = 2^bits - 1``, ``real = s * (q - z)`` (one float32 division, one multiply: the
forward equals :func:`pyzeroq.ops.fake_quantize`). The zero point ``z`` is fixed at
its initialization (:func:`pyzeroq.ops.asymmetric_params` on min/max), the step ``s``
is learned. With ``v = x / s``, ``lo = -z``, ``hi = Qmax - z``:

    d out / d x = 1 if lo <= v <= hi else 0                     (straight-through)
    d out / d s = (rne(v) - v if lo <= v <= hi else clamp bound) * g
    g = 1 / sqrt(N * Qmax)                                     (LSQ's gradient scale)

N = elements per step (per output channel for weights, per sample for activations).
:class:`LSQFunction` writes the backward explicitly; :func:`lsq_round_ste` is the same
thing with the round-STE / gradient-scale tricks (tests check they agree).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LSQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmax: int, grad_scale: float):
        v = x / scale
        lo, hi = -zero_point, qmax - zero_point
        q = torch.clamp(torch.round(v) + zero_point, 0, qmax) - zero_point
        ctx.save_for_backward(v, lo, hi, q)
        ctx.scale_shape = scale.shape
        ctx.grad_scale = grad_scale
        return q * scale

    @staticmethod
    def backward(ctx, grad):
        v, lo, hi, q = ctx.saved_tensors
        inside = (v >= lo) & (v <= hi)
        grad_x = grad * inside.to(grad.dtype)
        ds = torch.where(inside, q - v, q)  # q is the clamp bound outside
        grad_s = grad * ds * ctx.grad_scale
        # reduce to the scale's (broadcast) shape
        shape = ctx.scale_shape
        grad_s = grad_s.sum() if len(shape) == 0 else grad_s.sum_to_size(shape)
        return grad_x, grad_s.reshape(shape), None, None, None


def lsq_fake_quantize(x, scale, zero_point, qmax: int, grad_scale: float) -> torch.Tensor:
    return LSQFunction.apply(x, scale, zero_point, qmax, grad_scale)


def lsq_round_ste(x, scale, zero_point, qmax: int, grad_scale: float) -> torch.Tensor:
    """The same quantizer by the round-STE trick (for testing; forward may differ in the last ulp)."""
    s = (scale - scale * grad_scale).detach() + scale * grad_scale
    v = torch.clamp(x / s, -zero_point, qmax - zero_point)
    v = (torch.round(v) - v).detach() + v
    return v * s


class LSQQuantizer(nn.Module):
    """Learned-step fake quantizer; ``axis=0`` per output channel (weights), None per tensor.

    Initialization: :meth:`observe` tracks min/max (or the given tensor's percentile
    range) and :meth:`finalize` sets the step and zero point from
    ``pyzeroq.ops.asymmetric_params``; a quantizer never finalized initializes itself
    from its first input.
    """

    def __init__(self, bits: int, channels: int | None = None, percentile: float | None = None):
        super().__init__()
        self.bits = bits
        self.qmax = (1 << bits) - 1
        self.per_channel = channels is not None
        self.percentile = percentile
        n = channels if channels is not None else 1
        self.scale = nn.Parameter(torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._observed: list[torch.Tensor] = []

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            return t.view(-1, *([1] * (x.dim() - 1)))
        return t.view(())

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        from .. import ops  # imported here: the C++ extension is only needed once quantizing

        data = x.detach().float().cpu()
        if self.per_channel:
            scale, zp = ops.asymmetric_params(data.reshape(data.shape[0], -1).contiguous(), self.bits, axis=0,
                                              percentile=self.percentile)
        else:
            scale, zp = ops.asymmetric_params(data.reshape(-1).contiguous(), self.bits, percentile=self.percentile)
        self.scale.copy_(torch.as_tensor(scale, dtype=torch.float32).reshape(self.scale.shape))
        self.zero_point.copy_(torch.as_tensor(zp, dtype=torch.float32).reshape(self.zero_point.shape))
        self.initialized.fill_(True)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Accumulate the per-tensor range (activations): min and max over all observed inputs."""
        flat = x.detach().float().reshape(-1)
        if self.percentile is not None:
            self._observed.append(flat.cpu())
        else:
            self._observed.append(torch.stack([flat.min(), flat.max()]).cpu())

    @torch.no_grad()
    def finalize(self) -> None:
        if self._observed:
            self.init_from(torch.cat(self._observed))
            self._observed = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.init_from(x)
        n = x[0].numel()
        grad_scale = 1.0 / math.sqrt(n * self.qmax)
        scale = self.scale.abs().clamp(min=1e-8)
        return lsq_fake_quantize(x, self._view(scale, x), self._view(self.zero_point, x), self.qmax, grad_scale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"


class _LSQLayer(nn.Module):
    """A layer with LSQ-quantized weights (per output channel) and input (per tensor).

    The wrapped float layer is kept under ``inner_name`` ("conv" / "linear": the
    state-dict keys of saved detectors); ``observing`` records input ranges instead."""

    inner_name = ""

    def __init__(self, layer: nn.Module, weight_bits: int, act_bits: int, act_percentile: float | None = None):
        super().__init__()
        setattr(self, self.inner_name, layer)
        self.weight_quant = LSQQuantizer(weight_bits, layer.weight.shape[0])  # output channels / features
        self.act_quant = LSQQuantizer(act_bits, None, act_percentile)
        self.weight_quant.init_from(layer.weight)
        self.observing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = getattr(self, self.inner_name)
        if self.observing:
            self.act_quant.observe(x)
            return layer(x)
        return self._apply_layer(layer, self.act_quant(x), self.weight_quant(layer.weight))


class QuantConv2d(_LSQLayer):
    """Conv2d with LSQ-quantized weights (per output channel) and input (per tensor)."""

    inner_name = "conv"

    @staticmethod
    def _apply_layer(conv: nn.Conv2d, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return conv._conv_forward(x, w, conv.bias)


class QuantLinear(_LSQLayer):
    """Linear with LSQ-quantized weights (per output feature) and input (per tensor)."""

    inner_name = "linear"

    @staticmethod
    def _apply_layer(linear: nn.Linear, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, w, linear.bias)
