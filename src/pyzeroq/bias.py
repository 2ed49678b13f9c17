"""Weight scales that keep each conv / linear int32 bias exact and inside int32.

A layer's bias is stored as int32 codes at the accumulator's step (:func:`pyzeroq.qspec.quantize_bias`)::

    step[c] = f32(s_in * s_w[c])            code[c] = rne(f32(b[c] / step[c]))

with ``s_in`` the input scale (per tensor) and ``s_w[c]`` the weight scale of output channel c.
Two cases used to make that code silently wrong; :func:`fit_weight_scale` fixes both by
changing only the weight record (its scale, and the zero point of degenerate channels), which
the fake-quant forward, the integer plan, the ONNX builder and save / load all read.

1. **int32 overflow.** Tiny weights give a tiny ``s_w[c]`` and a bias code beyond int32
   (weights +-1e-9 with bias 5.0: code ~6e13, clipped, the channel outputs 0.0). A code must
   stay within ``INT32_MAX - A[c]`` (``-INT32_MIN - A'[c]`` below 0), where ``A[c]`` / ``A'[c]``
   are the largest positive / negative sums ``sum_k (x_k - z_x)(w_k - z_w)`` that any input codes
   can produce with the channel's weight codes (capped at :data:`MAX_ACCUMULATION_HEADROOM`), so
   that the accumulator ``code + sum`` cannot leave int32 either. A channel that does not fit gets
   the smallest float32 ``s_w[c]`` that does: a fitting scale from the float64 estimate
   ``|b| / (s_in * limit)``, then bisection on float32 values down to the old scale, each
   candidate checked with the float32 formula above and the weight codes at that scale (fitting
   is monotone: the bias code and ``|rne(w / s)|`` both shrink as ``s`` grows). The zero point
   is kept, so the representable range ``[-z_w * s_w, (qmax - z_w) * s_w]`` only widens and
   every weight stays inside. ``on_overflow="error"`` raises a
   ValueError naming the layer and channel instead; ``"clip"`` keeps the scale (the bias
   saturates at int32, the behaviour before this pass) and warns.

   onnxruntime's quantizer does the same (``_adjust_weight_scale_for_int32_bias`` in
   ``onnxruntime/python/tools/quantization/qdq_quantizer.py``, PR #22020; QOperator in #25278;
   off with ``QDQDisableWeightAdjustForInt32Bias``): when ``s_in * s_w`` is below
   ``1.0001 * 2 max|b| / (INT32_MAX - INT32_MIN - 1)`` it multiplies ``s_w`` by the ratio. Here
   the accumulation headroom is reserved as well and the float32 rounding is checked.

2. **Degenerate channels.** An all-zero weight channel (range ``[0, 0]``) gets the fallback
   scale 1.0 of :func:`pyzeroq.ops.asymmetric_params`, so its bias (the channel's whole output)
   is rounded at step ``s_in`` -- 11 output codes off in the case that was reported. Weights
   so small that ``step`` (or the requantization multiplier ``f32(step / s_out)``) is zero or
   subnormal in float32 break the integer model outright. Zero weights are exact at any scale,
   so such a channel gets the step::

       with an output quantizer:  step = s_out * OUTPUT_CODE_FRACTION   (bias error <= 1/512 code)
       logits (float output):     step = min |b| * LOGITS_RELATIVE_STEP  (relative error <= 2^-21)

   (never below what int32 and float32 need), ``s_w = f32(step / s_in)`` and the zero point
   ``clamp(rne(-min(w, 0) / s_w), 0, qmax)`` (symmetric signed weights keep zero point 0) -- 0 for
   zero weights, which stay exactly 0; weights
   whose range underflowed float32 (``|w| < 2^-149 * qmax``) become 0. A channel whose weights
   are one nonzero constant is not degenerate: its range ``[0, c]`` (0 is always in range) gives
   ``s_w = c / qmax`` and the constant is the code ``qmax``, exact within float32 rounding.

Per-tensor weights are one group: the single scale is fitted to the worst channel.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from . import ops
from .config import BIAS_OVERFLOW_MODES
from .qspec import INT32_MAX, INT32_MIN, TensorQuant, accumulation_extremes

__all__ = ["fit_weight_scale", "BiasOverflowWarning", "OUTPUT_CODE_FRACTION", "LOGITS_RELATIVE_STEP",
           "MAX_ACCUMULATION_HEADROOM"]

OUTPUT_CODE_FRACTION = 2.0 ** -8  # degenerate channel, quantized output: bias step = s_out / 256
LOGITS_RELATIVE_STEP = 2.0 ** -20  # degenerate logits channel: bias step = |b| / 2^20
MAX_ACCUMULATION_HEADROOM = 2 ** 30  # at most half of int32 is reserved for the products
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32: steps and multipliers stay above
USABLE_MARGIN = 2.0  # degenerate steps are at least this many times the smallest usable one
MAX_DOUBLINGS = 64  # a fitting scale is searched upward by doubling from the float64 estimate


def _levels(weight_q: TensorQuant) -> int:
    """Code steps across the weight range: 2^b - 1 asymmetric (the scale is span / that)."""
    return weight_q.qmax - weight_q.qmin


class BiasOverflowWarning(UserWarning):
    """A bias saturates at int32 (``bias_overflow="clip"``)."""


def _bias_codes(b: np.ndarray, step: np.ndarray) -> np.ndarray:
    """float64 ``rne(f32(b / step))`` (float32 division, as qspec.quantize_bias); b == 0 gives 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(np.asarray(b, np.float32) / np.asarray(step, np.float32)).astype(np.float64)
    return np.where(b == 0, 0.0, q)


def _acc_limits(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, weight_q: TensorQuant,
                input_q: TensorQuant) -> tuple[np.ndarray, np.ndarray]:
    """(upper, lower-magnitude) limits [C] of the bias codes of weights ``w`` [C, K] at ``scale`` /
    ``zp`` [C] (``weight_q``'s bits and code range): int32 less the largest accumulation of that sign."""
    codes = ops.quantize(w, scale, zp, weight_q.bits, axis=0, **weight_q.range_flags).astype(np.int64) \
        - zp.astype(np.int64)[:, None]
    up, down = (np.minimum(a, MAX_ACCUMULATION_HEADROOM) for a in accumulation_extremes(codes, input_q))
    return (INT32_MAX - up).astype(np.float64), (-INT32_MIN - down).astype(np.float64)


class _Layer:
    """One layer's numbers in float32 / float64, per output channel."""

    def __init__(self, name, weight, bias, weight_q: TensorQuant, input_q: TensorQuant,
                 output_q: Optional[TensorQuant]):
        self.name, self.weight_q, self.input_q = name, weight_q, input_q
        self.w = np.ascontiguousarray(np.asarray(weight, np.float32).reshape(np.shape(weight)[0], -1))
        channels = self.w.shape[0]
        self.b = np.zeros(channels, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(-1)
        if self.b.shape != (channels,):
            raise ValueError(f"layer {name!r}: bias must have {channels} values, got {self.b.shape}")
        if not np.isfinite(self.b).all():
            raise ValueError(f"layer {name!r}: the bias contains NaN or Inf")
        self.s_in = np.float32(input_q.scale_value)
        self.s_out = None if output_q is None else np.float32(output_q.scale_value)
        self.scale, self.zp = (a.copy() for a in weight_q.channels(channels))

    def groups(self) -> list[np.ndarray]:
        """The channel groups sharing a weight scale that may need a fit: per tensor the one group;
        per channel those that do not fit, have an unusable step or zero weights under a bias."""
        channels = np.arange(self.w.shape[0])
        if not self.weight_q.per_channel:
            return [channels]
        span = np.maximum(self.w.max(1), 0).astype(np.float64) - np.minimum(self.w.min(1), 0).astype(np.float64)
        zero = ~(np.float32(span / _levels(self.weight_q)) > 0) & (self.b != 0)
        suspect = ~self.fits(channels, self.scale) | ~self.usable_each(self.scale) | zero
        return [np.array([c]) for c in np.flatnonzero(suspect)]

    def step(self, s_w) -> np.ndarray:
        return (self.s_in * np.asarray(s_w, np.float32)).astype(np.float32)

    def limits(self, members: np.ndarray, s_w) -> tuple[np.ndarray, np.ndarray]:
        """:func:`_acc_limits` of the members at weight scale ``s_w`` (zero points as they are)."""
        s_w = np.broadcast_to(np.asarray(s_w, np.float32), members.shape)
        return _acc_limits(self.w[members], np.ascontiguousarray(s_w), self.zp[members], self.weight_q, self.input_q)

    def fits(self, members: np.ndarray, s_w) -> np.ndarray:
        """Bool per member: the bias code at weight scale ``s_w`` lies within the limits at ``s_w``."""
        codes = _bias_codes(self.b[members], np.broadcast_to(self.step(s_w), members.shape))
        up, down = self.limits(members, s_w)
        return (codes <= up) & (codes >= -down)

    def usable_each(self, s_w) -> np.ndarray:
        """Bool per scale: the step (and the requantization multiplier) are normal float32 numbers."""
        step = self.step(s_w)
        ok = np.isfinite(step) & (step >= FLOAT32_TINY)
        if self.s_out is not None:
            ok &= (step / self.s_out).astype(np.float32) >= FLOAT32_TINY
        return ok

    def usable(self, s_w) -> bool:
        return bool(np.all(self.usable_each(s_w)))

    def weight_range(self, members: np.ndarray) -> tuple[float, float]:
        w = self.w[members]
        return min(float(w.min()), 0.0), max(float(w.max()), 0.0)

    def record(self) -> TensorQuant:
        per = self.weight_q.per_channel
        return self.weight_q.with_params(self.scale if per else self.scale[0], self.zp if per else self.zp[0])


def _fitting_scale(layer: _Layer, members: np.ndarray, start: float, floor: Optional[float] = None) -> np.float32:
    """A float32 scale ``>= start`` at which every member's bias fits and the step is usable (``start``
    rounded up to float32, doubled until it does); with ``floor`` (a scale that does not fit), then
    the smallest such float32 above ``floor``, by bisection on the bit patterns (positive float32
    numbers are ordered as their int32 patterns; fitting is monotone in the scale: the bias code
    and, by ``|rne(w / s)|``, the accumulation both shrink as ``s`` grows)."""
    ok = lambda v: bool(layer.fits(members, v).all()) and layer.usable(v)  # noqa: E731
    s = np.float32(start)
    if float(s) < start:
        s = np.nextafter(s, np.float32(np.inf))
    for _ in range(MAX_DOUBLINGS):
        if ok(s):
            break
        s = np.float32(s * 2)
    else:
        raise RuntimeError(f"layer {layer.name!r}: no float32 weight scale from {start:.9g} fits the int32 bias")
    if floor is None:
        return s
    lo, hi = int(np.float32(floor).view(np.int32)), int(s.view(np.int32))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(np.int32(mid).view(np.float32)):
            hi = mid
        else:
            lo = mid
    return np.int32(hi).view(np.float32)


def _min_fit(layer: _Layer, members: np.ndarray) -> float:
    """float64 estimate of the smallest weight scale whose bias codes fit with the accumulation of
    the current weight codes (an upper bound on the true minimum; 0 for zero biases)."""
    b = layer.b[members].astype(np.float64)
    up, down = layer.limits(members, layer.scale[members])
    return float(np.max(np.abs(b) / (float(layer.s_in) * np.where(b >= 0, up, down))))


def _degenerate_reason(layer: _Layer, members: np.ndarray) -> Optional[str]:
    """Why this group's scale is unusable or needlessly coarse for its bias, or None."""
    if not layer.usable(layer.scale[members]):
        return "weight scale underflow (step or multiplier not a normal float32)"
    lo, hi = layer.weight_range(members)
    if np.float32((hi - lo) / _levels(layer.weight_q)) > 0 or not layer.b[members].any():
        return None
    return "zero weights" if _degenerate_step(layer, members) < float(layer.step(layer.scale[members]).min()) \
        else None


def _degenerate_step(layer: _Layer, members: np.ndarray) -> float:
    """The bias step of a degenerate group (module docstring, case 2)."""
    if layer.s_out is not None:
        return float(layer.s_out) * OUTPUT_CODE_FRACTION
    nonzero = np.abs(layer.b[members][layer.b[members] != 0]).astype(np.float64)
    return float(nonzero.min()) * LOGITS_RELATIVE_STEP if nonzero.size else float(layer.s_in)


def _adjustment(layer: _Layer, members, reason: str, action: str, new_scale, new_zp) -> dict:
    worst = int(members[np.argmax(np.abs(layer.b[members]))])
    c = int(members[0])
    return {"layer": layer.name, "channel": c if layer.weight_q.per_channel else None, "reason": reason,
            "action": action, "bias": float(layer.b[worst]), "old_scale": float(layer.scale[c]),
            "new_scale": float(new_scale), "old_zero_point": int(layer.zp[c]), "new_zero_point": int(new_zp)}


def _overflow(layer: _Layer, members: np.ndarray, on_overflow: str) -> Optional[dict]:
    """Enlarge (or report) the scale of a group whose bias codes do not fit; None if they do."""
    fits = layer.fits(members, layer.scale[members])
    if fits.all():
        return None
    c = int(members[np.argmin(fits)])
    old = layer.scale[c]
    if on_overflow == "error":
        code = _bias_codes(layer.b[c:c + 1], layer.step(old[None]))[0]
        up, down = layer.limits(np.array([c]), old)
        raise ValueError(f"layer {layer.name!r} channel {c}: the int32 bias overflows: bias {float(layer.b[c]):.9g} "
                         f"at step f32({float(layer.s_in):.9g} * {float(old):.9g}) needs code {code:.6g}, beyond "
                         f"[-{down[0]:.0f}, {up[0]:.0f}] (int32 less the accumulation headroom); "
                         "QuantConfig(bias_overflow='enlarge') enlarges this channel's weight scale instead")
    reason = "int32 bias overflow"
    if on_overflow == "clip":
        warnings.warn(f"layer {layer.name!r} channel {c}: the int32 bias of {float(layer.b[c]):.9g} saturates "
                      "(bias_overflow='clip'); 'enlarge' would fit it", BiasOverflowWarning, stacklevel=2)
        return _adjustment(layer, members, reason, "clipped", old, layer.zp[c])
    new = _fitting_scale(layer, members, max(_min_fit(layer, members), float(old)), floor=old)
    record = _adjustment(layer, members, reason, "weight scale enlarged", new, layer.zp[c])
    layer.scale[members] = new
    return record


def _degenerate(layer: _Layer, members: np.ndarray) -> Optional[dict]:
    """Rescale a degenerate group (module docstring, case 2); None when it is not one."""
    reason = _degenerate_reason(layer, members)
    if reason is None:
        return None
    floor = FLOAT32_TINY * USABLE_MARGIN * max(1.0, float(layer.s_out or 1.0)) / float(layer.s_in)
    target = max(_degenerate_step(layer, members) / float(layer.s_in), _min_fit(layer, members))
    new = _fitting_scale(layer, members, max(floor, target))
    lo, _ = layer.weight_range(members)
    q = layer.weight_q
    # symmetric (signed) weights keep their fixed zero point; asymmetric ones place 0 at rne(-lo / s)
    zp = int(layer.zp[members[0]]) if q.signed else int(np.clip(np.rint(-lo / float(new)), q.qmin, q.qmax))
    record = _adjustment(layer, members, reason, "weight scale set", new, zp)
    layer.scale[members], layer.zp[members] = new, zp
    return record


def fit_weight_scale(name: str, weight, bias, weight_q: TensorQuant, input_q: TensorQuant,
                     output_q: Optional[TensorQuant] = None,
                     on_overflow: str = "enlarge") -> tuple[TensorQuant, list[dict]]:
    """(weight record, adjustments): ``weight_q`` with the scales of degenerate and overflowing
    channels fitted as in the module docstring (``weight_q`` itself when nothing changes).

    weight [O, ...] and bias [O] (or None) are the layer's float parameters; input_q / output_q
    the per-tensor records of its input and output (None: float output, the logits).
    on_overflow: "enlarge", "error" (ValueError naming the layer and channel) or "clip".
    Each adjustment is a dict: layer, channel (None for per-tensor weights), reason, action,
    bias (the group's largest), old_scale, new_scale, old_zero_point, new_zero_point.
    """
    if on_overflow not in BIAS_OVERFLOW_MODES:
        raise ValueError(f"on_overflow must be one of {BIAS_OVERFLOW_MODES}, got {on_overflow!r}")
    layer = _Layer(name, weight, bias, weight_q, input_q, output_q)
    records = []
    for members in layer.groups():
        record = _degenerate(layer, members) or _overflow(layer, members, on_overflow)
        if record is not None:
            records.append(record)
    if not any(r["action"] != "clipped" for r in records):
        return weight_q, records
    return layer.record(), records
