"""One family of fake quantizers for post-training calibration (ZeroQ) and QAT (LSQ).

:class:`Quantizer` holds how one tensor is quantized (``scale`` / ``zero_point``, per
tensor or per channel); :meth:`Quantizer.record` returns it as a frozen
:class:`pyzeroq.qspec.TensorQuant`. Modes: "off" (identity), "observe" (identity,
records ranges), "quantize" (fake quantization). After :meth:`Quantizer.learn_step`
the step is an ``nn.Parameter`` trained by LSQ (Esser et al. 2020, "Learned Step Size
Quantization"); the forward is the same formula either way (``pyzeroq.ops.fake_quantize``:
``q = clamp(rne(x / s) + z, Qmin, Qmax)``, ``real = s * (q - z)``). The code range and the
choice of parameters (asymmetric / symmetric, unsigned / signed codes) come from each
quantizer's :class:`pyzeroq.qspec.CodeFormat`.

LSQ gradients, with ``v = x / s``, ``lo = Qmin - z``, ``hi = Qmax - z``::

    d out / d x = 1 if lo <= v <= hi else 0                     (straight-through)
    d out / d s = (rne(v) - v if lo <= v <= hi else clamp bound) * g
    g = 1 / sqrt(N * Qmax)                                     (LSQ's gradient scale, Qmax = Q_P)

N = elements per step (per output channel for weights, per sample for activations).

:class:`QuantConv2d` / :class:`QuantLinear` quantize their weight (``weight_quant``),
their int32 bias at scale ``input_scale * weight_scale[c]``, and, when they own it
(``act_quant``, the QAT layout of :mod:`pyzeroq.detection`), their input;
:meth:`QuantLayerMixin.layer_record` returns the layer's :class:`pyzeroq.qspec.LayerQuant`.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .bias import fit_weight_scale
from .config import ACT_RANGES
from .qspec import INT32_MAX, INT32_MIN, UNSIGNED_ASYMMETRIC, CodeFormat, LayerQuant, TensorQuant, quantize_bias

__all__ = ["BitWidthMismatchError", "Quantizer", "QuantAct", "WeightQuant", "QuantConv2d", "QuantConv1d", "QuantLinear",
           "QuantConvTranspose2d", "ChannelAffine", "QuantChannelAffine", "QUANT_LAYER_TYPES", "QUANT_CONV_TYPES",
           "lsq_fake_quantize", "lsq_round_ste", "mse_clip_range", "mse_weight_range", "WEIGHT_RANGES"]

ACT_SAMPLE_CAP = 1 << 22  # values kept per quantizer for percentile / MSE calibration
MSE_CLIP_STEPS = 100  # the MSE range search tries [a * min, a * max] for a = k / MSE_CLIP_STEPS
MIN_LEARNED_SCALE = 1e-8  # a learned step is used as max(|s|, this)
MODES = ("off", "observe", "quantize")
WEIGHT_RANGES = ("minmax", "mse")  # WeightQuant.weight_range (QuantConfig.weight_range)


# ---------------------------------------------------------------------------- LSQ autograd
class LSQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, grad_scale: float):
        v = x / scale
        lo, hi = qmin - zero_point, qmax - zero_point
        q = torch.clamp(torch.round(v) + zero_point, qmin, qmax) - zero_point
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
        shape = ctx.scale_shape
        grad_s = grad_s.sum() if len(shape) == 0 else grad_s.sum_to_size(shape)
        return grad_x, grad_s.reshape(shape), None, None, None, None


def lsq_fake_quantize(x, scale, zero_point, qmax: int, grad_scale: float, qmin: int = 0) -> torch.Tensor:
    """LSQ fake quantization over codes ``[qmin, qmax]`` (forward = ``ops.fake_quantize``; gradients above)."""
    return LSQFunction.apply(x, scale, zero_point, qmin, qmax, grad_scale)


def lsq_round_ste(x, scale, zero_point, qmax: int, grad_scale: float, qmin: int = 0) -> torch.Tensor:
    """The same quantizer by the round-STE trick (for testing; forward may differ in the last ulp)."""
    s = (scale - scale * grad_scale).detach() + scale * grad_scale
    v = torch.clamp(x / s, qmin - zero_point, qmax - zero_point)
    v = (torch.round(v) - v).detach() + v
    return v * s


def mse_clip_range(values: np.ndarray, bits: int, fmt: CodeFormat = UNSIGNED_ASYMMETRIC) -> tuple[float, float]:
    """The clipping range ``[a * min, a * max]`` (``a = k / MSE_CLIP_STEPS``, k = 1..steps)
    whose ``bits``-bit fake quantization in format ``fmt`` (its parameters from that range,
    :meth:`CodeFormat.params`) of ``values`` has the least squared error (sum over values, in
    float64); ties go to the widest range. ``min <= 0 <= max`` as in
    :func:`pyzeroq.ops.asymmetric_params`."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if values.size == 0:
        raise ValueError("mse_clip_range: no activation values to calibrate on")
    if not np.isfinite(values).all():
        raise ValueError("mse_clip_range: the calibration activations contain NaN or Inf")
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    out = np.empty_like(values)
    best, best_err = (lo, hi), np.inf
    for k in range(MSE_CLIP_STEPS, 0, -1):  # widest first: strict "<" keeps it on ties
        a = k / MSE_CLIP_STEPS
        rng = np.array([a * lo, a * hi], dtype=np.float32)
        scale, zp = fmt.params(rng, bits)
        ops.fake_quantize(values, scale, zp, bits, out=out, **fmt.range_flags)
        err = float(np.square(out.astype(np.float64) - values).sum())
        if err < best_err:
            best, best_err = (float(rng[0]), float(rng[1])), err
    return best


def mse_weight_range(weight: np.ndarray, bits: int, fmt: CodeFormat = UNSIGNED_ASYMMETRIC,
                     axis: Optional[int] = 0) -> np.ndarray:
    """float32 [C, 2] (or [2] for ``axis=None``): per output channel the clipping range
    ``[a * min_c, a * max_c]`` (``a = k / MSE_CLIP_STEPS``, k = 1..steps, ``min_c <= 0 <= max_c``)
    whose ``bits``-bit fake quantization in format ``fmt`` of that channel's weights has the
    least squared error (float64 sum; ties go to the widest range) -- :func:`mse_clip_range`
    applied to every row of ``weight`` [C, K] at once (one fake quantization of the whole
    tensor per ``a``). The "MSE weight ranges" of AdaRound (Nagel et al. 2020, Sec. 5) and
    BRECQ (Li et al. 2021). Pass the result to ``fmt.params(range, bits, axis=0)``.
    """
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if axis is None:
        return np.asarray(mse_clip_range(w.reshape(-1), bits, fmt), dtype=np.float32)
    w = w.reshape(w.shape[0], -1)
    if w.size == 0 or not np.isfinite(w).all():
        raise ValueError("mse_weight_range: weight must be a non-empty finite [C, K] array")
    # float64 as mse_clip_range's Python floats: a * lo rounds to float32 once, the same way
    lo, hi = np.minimum(w.min(1), 0.0).astype(np.float64), np.maximum(w.max(1), 0.0).astype(np.float64)
    best = np.stack([lo, hi], 1).astype(np.float32)
    best_err = np.full(w.shape[0], np.inf)
    out = np.empty_like(w)
    for k in range(MSE_CLIP_STEPS, 0, -1):  # widest first: strict "<" keeps it on ties
        a = k / MSE_CLIP_STEPS
        rng = np.stack([a * lo, a * hi], 1).astype(np.float32)
        scale, zp = fmt.params(rng, bits, axis=0)
        ops.fake_quantize(w, scale, zp, bits, axis=0, out=out, **fmt.range_flags)
        err = np.square(out.astype(np.float64) - w).sum(1)
        better = err < best_err
        best[better], best_err[better] = rng[better], err[better]
    return best


# ---------------------------------------------------------------------------- quantizers
class BitWidthMismatchError(ValueError):
    """A state dict quantized with other bit widths than the model it is loaded into."""


class Quantizer(nn.Module):
    """Fake quantizer of one tensor (base of :class:`QuantAct` and :class:`WeightQuant`).

    ``bits``: 2..16, or None (float: mode stays "off"). ``channels``: None per tensor
    (``scale`` / ``zero_point`` shape ``()``), else per channel along axis 0 (shape ``[C]``).
    ``fmt``: the code range and parameter rule (:class:`pyzeroq.qspec.CodeFormat`; default
    unsigned asymmetric).
    Buffers ``scale`` (float32; an ``nn.Parameter`` once :meth:`learn_step` was called) and
    ``zero_point`` (int64) are the state-dict layout.
    """

    def __init__(self, bits: Optional[int], channels: Optional[int] = None, fmt: CodeFormat = UNSIGNED_ASYMMETRIC):
        super().__init__()
        if not isinstance(fmt, CodeFormat):
            raise TypeError(f"fmt must be a pyzeroq.qspec.CodeFormat, got {type(fmt).__name__}")
        self.bits = bits
        self.fmt = fmt
        self.axis = None if channels is None else 0
        shape = () if channels is None else (int(channels),)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int64))
        self.mode = "off"
        self.learned = False

    @property
    def qmin(self) -> int:
        return ops.qrange(self.bits, **self.fmt.range_flags)[0]

    @property
    def qmax(self) -> int:
        return ops.qrange(self.bits, **self.fmt.range_flags)[1]

    def extra_repr(self) -> str:
        kind = "per-tensor" if self.axis is None else f"per-channel[{self.scale.numel()}]"
        fmt = "" if self.fmt == UNSIGNED_ASYMMETRIC else f", {self.fmt}"
        return f"bits={self.bits}, {kind}, mode={self.mode}{', learned step' if self.learned else ''}{fmt}"

    def learn_step(self) -> "Quantizer":
        """Make ``scale`` a trainable LSQ step (same state-dict key)."""
        if not self.learned:
            s = self.scale.detach().clone()
            del self._buffers["scale"]
            self.scale = nn.Parameter(s)
            self.learned = True
        return self

    def get_extra_state(self) -> dict:
        """Bits and mode travel in the state dict (``<prefix>._extra_state``), so that loading a
        state dict quantized with other bit widths fails instead of silently mixing."""
        return {"bits": self.bits, "mode": self.mode, "learned": self.learned, "format": self.fmt.to_dict()}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "bits" not in state:
            raise ValueError(f"quantizer extra state must be a dict with 'bits', got {state!r}")
        if state["bits"] != self.bits:
            raise BitWidthMismatchError(f"the state dict has {state['bits']}-bit codes where this model has "
                                        f"{self.bits}-bit codes")
        fmt = CodeFormat(**state.get("format", UNSIGNED_ASYMMETRIC.to_dict()))
        if fmt != self.fmt:
            raise BitWidthMismatchError(f"the state dict has codes {fmt} where this model has {self.fmt}")
        if bool(state.get("learned", False)) != self.learned:
            raise ValueError(f"the state dict has a {'learned' if state.get('learned') else 'fixed'} step where "
                             f"this model has a {'learned' if self.learned else 'fixed'} one")
        self.mode = state.get("mode", self.mode)

    def effective_scale(self) -> torch.Tensor:
        return self.scale.abs().clamp(min=MIN_LEARNED_SCALE) if self.learned else self.scale

    @torch.no_grad()
    def set_params(self, scale, zero_point) -> None:
        self.scale.copy_(torch.as_tensor(np.asarray(scale), dtype=torch.float32).reshape(self.scale.shape))
        self.zero_point.copy_(torch.as_tensor(np.asarray(zero_point), dtype=torch.int64).reshape(self.zero_point.shape))

    def record(self) -> TensorQuant:
        """The frozen :class:`TensorQuant` this quantizer applies now."""
        if self.bits is None or self.mode != "quantize":
            raise ValueError(f"quantizer is not quantizing (bits={self.bits}, mode={self.mode!r}): "
                             "calibrate it first (act_bits / weight bits set)")
        scale = self.effective_scale().detach().cpu().float().numpy()
        return self.fmt.record(self.bits, scale, self.zero_point.detach().cpu().numpy(), self.axis)

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t if self.axis is None else t.view(-1, *([1] * (x.dim() - 1)))

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quantization with gradients: LSQ when the step is learned, else STE."""
        if self.learned:
            grad_scale = 1.0 / math.sqrt(x[0].numel() * self.qmax)
            return lsq_fake_quantize(x, self._view(self.effective_scale(), x),
                                     self._view(self.zero_point.to(x.dtype), x), self.qmax, grad_scale, self.qmin)
        return ops.fake_quantize_ste(x, self.scale, self.zero_point, self.bits, axis=self.axis,
                                     **self.fmt.range_flags)


class QuantAct(Quantizer):
    """Per-tensor activation quantizer: "observe" collects the range, :meth:`freeze` sets
    scale / zero point by ``act_range`` ("minmax", or its ``percentile`` clipping, or "mse")."""

    def __init__(self, bits: Optional[int] = 8, percentile: Optional[float] = None, act_range: str = "minmax",
                 fmt: CodeFormat = UNSIGNED_ASYMMETRIC):
        super().__init__(bits, fmt=fmt)
        if act_range not in ACT_RANGES:
            raise ValueError(f"act_range must be one of {ACT_RANGES}, got {act_range!r}")
        self.percentile = percentile
        self.act_range = act_range
        self._min = self._max = None
        self._samples: list[torch.Tensor] = []
        self._sampled = 0
        # a range known without calibration (the normalized image of [0, 1] pixels)
        self.fixed_range: Optional[tuple[float, float]] = None
        # pooling keeps its input's range: reuse that quantizer's params (set by the surgery)
        self.same_as = None  # QuantAct or None; a plain attribute, not a submodule

    def extra_repr(self) -> str:
        if self.mode == "quantize" and self.bits is not None:
            return f"bits={self.bits}, mode={self.mode}, scale={float(self.effective_scale().detach()):.6g}, " \
                   f"zero_point={int(self.zero_point)}"
        return f"bits={self.bits}, mode={self.mode}"

    def reset(self) -> None:
        self._min = self._max = None
        self._samples, self._sampled = [], 0

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1).cpu()
        lo, hi = flat.min(), flat.max()
        self._min = lo if self._min is None else torch.minimum(self._min, lo)
        self._max = hi if self._max is None else torch.maximum(self._max, hi)
        if (self.percentile is not None or self.act_range == "mse") and self._sampled < ACT_SAMPLE_CAP:
            self._samples.append(flat[:ACT_SAMPLE_CAP - self._sampled].clone())
            self._sampled += len(self._samples[-1])

    def _range_values(self) -> np.ndarray:
        if self.fixed_range is not None:
            return np.asarray(self.fixed_range, dtype=np.float32)
        if self.percentile is not None:
            return torch.cat(self._samples).numpy()
        if self.act_range == "mse":
            return np.asarray(mse_clip_range(torch.cat(self._samples).numpy(), self.bits, self.fmt), dtype=np.float32)
        return torch.stack([self._min, self._max]).numpy()

    @torch.no_grad()
    def freeze(self) -> None:
        """Compute scale / zero point from what was observed and switch to "quantize"."""
        if self._min is None and self.fixed_range is None and self.same_as is None:
            raise RuntimeError("QuantAct.freeze() called before any calibration data was observed")
        if self.bits is None:
            self.mode = "off"
            return
        if self.same_as is not None:
            if self.same_as.mode != "quantize":
                self.same_as.freeze()
            self.set_params(self.same_as.effective_scale().detach(), self.same_as.zero_point)
        else:
            scale, zp = self.fmt.params(self._range_values(), self.bits, percentile=self.percentile)
            self.set_params(scale, zp)
        self.reset()
        self.mode = "quantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            self.observe(x)
            return x
        return self.fake_quantize(x)


class WeightQuant(Quantizer):
    """Weight quantizer, per output channel (``channels`` set) or per tensor; parameters
    from :func:`pyzeroq.ops.asymmetric_params` of the weight (:meth:`calibrate`). With a
    fixed step the fake-quantized weight is cached until the weight or the bits change."""

    def __init__(self, bits: Optional[int], channels: Optional[int] = None, fmt: CodeFormat = UNSIGNED_ASYMMETRIC):
        super().__init__(bits, channels, fmt)
        self._cache = None
        self.weight_range = "minmax"  # or "mse": :func:`mse_weight_range` (set by the pipeline)

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor, bits: Optional[int]) -> None:
        """Set ``bits`` and the range parameters from ``weight`` [O, ...]; None: float weights."""
        self.bits, self._cache = bits, None
        if bits is None:
            self.mode = "off"
            return
        w = weight.detach().float().cpu()
        w = w.reshape(w.shape[0], -1).contiguous() if self.axis == 0 else w.reshape(-1).contiguous()
        if self.weight_range == "mse":
            w = torch.from_numpy(mse_weight_range(w.numpy(), bits, self.fmt, self.axis))
        scale, zp = self.fmt.params(w, bits, axis=self.axis)
        self.set_params(scale, zp)
        self.mode = "quantize"

    def set_record(self, record: TensorQuant) -> None:
        """Apply a weight record of this quantizer's bits and layout (e.g. from
        :func:`pyzeroq.bias.fit_weight_scale`): its scale and zero point become the buffers."""
        if record.bits != self.bits or record.axis != self.axis or record.scale.shape != tuple(self.scale.shape) \
                or (record.signed, record.narrow_range) != (self.fmt.signed, self.fmt.narrow_range):
            raise ValueError(f"record {record!r} does not fit this quantizer ({self.extra_repr()})")
        self.set_params(np.array(record.scale), np.array(record.zero_point))  # writable copies for torch
        self._cache = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.mode != "quantize":
            return weight
        if self.learned:
            return self.fake_quantize(weight)
        key = (self.bits, weight._version, self.scale._version, self.zero_point._version, weight.data_ptr())
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                qw = ops.fake_quantize(weight.detach().cpu().contiguous(), self.scale, self.zero_point, self.bits,
                                       axis=self.axis, **self.fmt.range_flags)
            self._cache = (key, qw.to(weight.device))
        return self._cache[1]


# ---------------------------------------------------------------------------- layers
class QuantLayerMixin:
    """Shared by :class:`QuantConv2d` / :class:`QuantLinear`.

    ``weight_quant``: the weight quantizer (submodule). ``act_quant``: the input quantizer when
    the layer owns it (QAT layout; a submodule run in ``forward``), else None and the fx graph
    quantizes the input before the layer; ``input_quant`` points at the quantizer of the input
    either way. ``output_quant`` / ``activation``: the quantizer of the output and the fused
    clamp ("relu" / "relu6" / None), set by the fx surgery (None for a float output).
    """

    def _init_quant(self, per_channel: bool, act_quant: Optional[QuantAct] = None,
                    weight_format: CodeFormat = UNSIGNED_ASYMMETRIC) -> None:
        self.weight_quant = WeightQuant(None, self.weight.shape[0] if per_channel else None, weight_format)
        self.act_quant = act_quant
        object.__setattr__(self, "input_quant", act_quant)
        object.__setattr__(self, "output_quant", None)
        self.activation: Optional[str] = None

    @property
    def observing(self) -> bool:
        """Calibrating the owned input quantizer (its mode "observe"): the layer then runs with
        float weights and bias, so the ranges seen do not depend on weight quantization."""
        return self.act_quant is not None and self.act_quant.mode == "observe"

    @property
    def per_channel(self) -> bool:
        return self.weight_quant.axis is not None

    @property
    def weight_bits(self) -> Optional[int]:
        return self.weight_quant.bits

    def set_weight_bits(self, bits: Optional[int]) -> None:
        self.weight_quant.calibrate(self.weight, bits)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight)

    def _input_quantizing(self) -> bool:
        q = self.input_quant
        return q is not None and q.mode == "quantize" and q.bits is not None

    def quantized_bias(self) -> Optional[torch.Tensor]:
        """Bias rounded to int32 at scale ``f32(input_scale * weight_scale[c])`` when both are
        quantized (straight-through gradient to the bias in QAT)."""
        if self.bias is None or self.weight_quant.mode != "quantize" or not self._input_quantizing():
            return self.bias
        w_scale = self.weight_quant.effective_scale().detach().float().reshape(-1)
        bias_scale = (self.input_quant.effective_scale().detach().float() * w_scale).to(self.bias.device)
        codes = torch.clamp(torch.round(self.bias.detach() / bias_scale), INT32_MIN, INT32_MAX)
        # value exactly codes * bias_scale (x + 0.0 == x); gradient 1 to the bias (straight through)
        return codes * bias_scale + (self.bias - self.bias.detach())

    def fit_bias_scale(self, name: str, on_overflow: str = "enlarge") -> tuple[Optional[TensorQuant], list[dict]]:
        """(fitted weight record, or None when unchanged; adjustments): :func:`pyzeroq.bias.fit_weight_scale`
        on this layer's records, so that its int32 bias is exact and fits. Changes nothing itself
        (apply with ``weight_quant.set_record``); ``(None, [])`` when the bias is not integer."""
        if self.weight_quant.mode != "quantize" or not self._input_quantizing():
            return None, []
        weight_q = self.weight_quant.record()
        out_q = self._output_record()
        bias = None if self.bias is None else self.bias.detach().cpu().float().numpy()
        fitted, adjustments = fit_weight_scale(name, self.weight.detach().cpu().float().numpy(), bias, weight_q,
                                               self.input_quant.record(), out_q, on_overflow)
        return (None if fitted is weight_q else fitted), adjustments

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act_quant is None else self.act_quant(x)

    def _output_record(self) -> Optional[TensorQuant]:
        out = self.output_quant
        return out.record() if out is not None and out.mode == "quantize" else None

    def layer_record(self, name: str) -> LayerQuant:
        """This layer's :class:`LayerQuant` (weight codes, int32 bias, records, fused clamp).

        Raises ValueError when the weight or the input is not quantized."""
        if self.weight_quant.mode != "quantize":
            raise ValueError(f"layer {name!r} has float weights (weight bits None); it has no integer form")
        if not self._input_quantizing():
            raise ValueError(f"layer {name!r}: its input is not quantized (act_bits None or not calibrated)")
        weight_q = self.weight_quant.record()
        in_q = self.input_quant.record()
        w = self.weight.detach().cpu().float().contiguous().numpy()
        codes = weight_q.quantize(w)
        bias = None if self.bias is None else \
            quantize_bias(self.bias.detach().cpu().float().numpy(), in_q, weight_q)
        out_q = self._output_record()
        return LayerQuant(name, weight_q, codes, in_q, out_q, bias, self.activation if out_q is not None else None)


class _QuantConvMixin(QuantLayerMixin):
    """The conv forms: one constructor and forward for Conv1d and Conv2d."""

    @classmethod
    def from_float(cls, conv: nn.Module, per_channel: bool = True, act_quant: Optional[QuantAct] = None,
                   weight_format: CodeFormat = UNSIGNED_ASYMMETRIC):
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                device=conv.weight.device, dtype=conv.weight.dtype)
        q.load_state_dict(conv.state_dict())
        q._init_quant(per_channel, act_quant, weight_format)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        if self.observing:
            return self._conv_forward(x, self.weight, self.bias)
        return self._conv_forward(x, self.quantized_weight(), self.quantized_bias())


class QuantConv2d(nn.Conv2d, _QuantConvMixin):
    """Conv2d with quantized weight (per output channel), int32 bias and, in QAT, input."""

    forward = _QuantConvMixin.forward  # before nn.Conv2d's in the MRO


class QuantConv1d(nn.Conv1d, _QuantConvMixin):
    """Conv1d with quantized weight (per output channel), int32 bias and, in QAT, input (the
    integer model runs it as a Conv2d on [N, C, 1, L])."""

    forward = _QuantConvMixin.forward


class QuantLinear(nn.Linear, QuantLayerMixin):
    """Linear with quantized weight (per output feature), int32 bias and, in QAT, input."""

    @classmethod
    def from_float(cls, linear: nn.Linear, per_channel: bool = True, act_quant: Optional[QuantAct] = None,
                   weight_format: CodeFormat = UNSIGNED_ASYMMETRIC) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype)
        q.load_state_dict(linear.state_dict())
        q._init_quant(per_channel, act_quant, weight_format)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        if self.observing:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.quantized_weight(), self.quantized_bias())


class ChannelAffine(nn.Conv1d):
    """A per-channel affine map ``y[:, c] = x[:, c] * w[c] + b[c]`` on [N, C, ...] of any rank, as the
    depthwise 1x1 Conv1d over [N, C, prod(...)]: what a BatchNorm1d that follows no layer becomes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(x.shape[0], x.shape[1], -1)).reshape(x.shape)


class QuantChannelAffine(QuantConv1d):
    """Quantized :class:`ChannelAffine` (the integer model's ConvStep with ``spatial_dims=0``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantConvMixin.forward(self, x.reshape(x.shape[0], x.shape[1], -1)).reshape(x.shape)


class QuantConvTranspose2d(nn.Conv2d, _QuantConvMixin):
    """ConvTranspose2d (groups 1) held as the equivalent convolution: ``weight`` is the transposed
    conv's weight in conv layout, ``w[o, i] = flip(w_t[i, o])`` (kernel flipped), so the weight is
    quantized per output channel like every conv. The forward is torch's conv_transpose2d with
    the (fake-quantized) weight mapped back; the integer model runs the same convolution on the
    input with ``stride - 1`` zero-point codes inserted between pixels (ConvStep ``upsample``)."""

    @staticmethod
    def supports(conv: nn.ConvTranspose2d) -> bool:
        """Groups 1 and zero padding: the forms with an equivalent convolution here."""
        return conv.groups == 1 and conv.padding_mode == "zeros"

    @classmethod
    def from_float(cls, conv: nn.ConvTranspose2d, per_channel: bool = True, act_quant: Optional[QuantAct] = None,
                   weight_format: CodeFormat = UNSIGNED_ASYMMETRIC):
        if not cls.supports(conv):
            raise ValueError("ConvTranspose2d with groups > 1 or non-zero padding has no quantized form")
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, 1, 0, conv.dilation, 1,
                bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(conv.weight.detach().transpose(0, 1).flip(2, 3))
            if conv.bias is not None:
                q.bias.copy_(conv.bias.detach())
        q.transpose_stride, q.transpose_padding = tuple(conv.stride), tuple(conv.padding)
        q.output_padding = tuple(conv.output_padding)
        q._init_quant(per_channel, act_quant, weight_format)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        weight, bias = (self.weight, self.bias) if self.observing else (self.quantized_weight(), self.quantized_bias())
        return F.conv_transpose2d(x, weight.flip(2, 3).transpose(0, 1), bias, self.transpose_stride,
                                  self.transpose_padding, self.output_padding, 1, self.dilation)


QUANT_LAYER_TYPES = (QuantConv2d, QuantConv1d, QuantConvTranspose2d, QuantLinear)  # QuantChannelAffine: a Conv1d
QUANT_CONV_TYPES = (QuantConv2d, QuantConv1d, QuantConvTranspose2d)
