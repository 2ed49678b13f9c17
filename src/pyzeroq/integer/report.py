"""The integer model's accumulator report: per conv / linear layer, the accumulator range seen
in the runs since the last reset, the worst case over all input codes, and which register widths
the observed values would overflow."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..qspec import accumulation_extremes
from .simulate import quantize_multiplier
from .steps import AddStep, ConvStep, LinearStep, MulStep, Step

__all__ = ["IntegerReport", "REPORT_ACC_BITS", "GemmlowpRangeWarning", "gemmlowp_risks"]

REPORT_ACC_BITS = (8, 12, 16, 24)  # accumulator widths the report checks


@dataclass
class IntegerReport:
    """Per-layer accumulator ranges of the runs since the last ``reset_stats``.

    ``layers``: one dict per conv / linear: ``max_abs_acc`` and ``bits_needed`` (observed,
    bias included), ``bound_bits`` (worst case over all input codes), ``overflows``
    (outputs that overflowed the configured ``acc_bits``) and ``overflow_int<B>`` (the
    observed accumulators would not fit a B-bit register) for B in REPORT_ACC_BITS.
    """

    acc_bits: int
    overflow: str
    rounding: str
    images: int
    layers: list
    folded_bn: dict

    def overflowing(self, bits: int = 16) -> list:
        """Layers whose observed accumulators need more than ``bits`` bits."""
        return [r["layer"] for r in self.layers if r["bits_needed"] > bits]

    def to_markdown(self) -> str:
        head = ["layer", "op", "max abs acc", "bits needed", "worst-case bits",
                f"overflows (acc_bits={self.acc_bits})"] + [f"int{b} overflow" for b in REPORT_ACC_BITS]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.layers:
            cells = [r["layer"], r["op"], r["max_abs_acc"], r["bits_needed"], r["bound_bits"], r["overflows"]] + \
                ["yes" if r[f"overflow_int{b}"] else "no" for b in REPORT_ACC_BITS]
            rows.append("| " + " | ".join(str(c) for c in cells) + " |")
        return "\n".join(rows)

    __str__ = to_markdown


def _bits_for(lo: int, hi: int) -> int:
    """Signed bits holding [lo, hi] (0 included), as the simulator's AccStats.bits_needed."""
    b = 1
    while not (min(lo, 0) >= -(1 << (b - 1)) and max(hi, 0) <= (1 << (b - 1)) - 1):
        b += 1
    return b


def _worst_case_bits(step: Step) -> int:
    """Bits of the largest accumulator any input codes could produce (conv / linear / logits step)."""
    layer = step.layer
    _, w_zp = layer.weight.channels(layer.out_channels)
    w = layer.weight_codes.reshape(layer.out_channels, -1).astype(np.int64) - w_zp.astype(np.int64)[:, None]
    bias = layer.bias.astype(np.int64) if layer.bias is not None else np.zeros(w.shape[0], np.int64)
    up, down = accumulation_extremes(w, layer.input)
    return _bits_for(int((bias - down).min()), int((bias + up).max()))


# ---------------------------------------------------------------------------- gemmlowp range
INT32_BITS = 32
GEMMLOWP_ADD_SHIFT = 20  # TFLite's uint8 Add: inputs shifted left by 20 bits


class GemmlowpRangeWarning(UserWarning):
    """``rounding="gemmlowp"`` where TFLite's fixed-point requantization can wrap int32."""


def _left_shift(multiplier: float) -> int:
    """The left shift TFLite applies before its Q31 multiply: QuantizeMultiplier's positive exponent
    (:func:`pyzeroq.integer.simulate.quantize_multiplier`, the simulator's own)."""
    return max(quantize_multiplier(multiplier)[1], 0) if multiplier > 0 else 0


def _span_bits(q) -> int:
    """Signed bits of the largest ``|code - zero point|`` of a per-tensor record."""
    z = q.zero_point_value
    return _bits_for(q.qmin - z, q.qmax - z)


def gemmlowp_risks(steps: list) -> list[str]:
    """The steps whose gemmlowp requantization (TFLite reference kernels) can wrap int32, one line
    each: a conv / linear or a product whose multiplier ``M > 1`` is applied as ``acc * 2^shift``
    (``MultiplyByQuantizedMultiplier``) with ``bits(acc) + shift > 32``, and an add whose output
    multiplier ``2 max(s_a, s_b) / (2^20 s_out)`` exceeds 1 (TFLite Add's 20-bit left shift). The
    simulator reproduces the runtime, wrap included; this only says where."""
    risks = []
    for step in steps:
        if isinstance(step, (ConvStep, LinearStep)):
            layer = step.layer
            w_scale, _ = layer.weight.channels(layer.out_channels)
            mult = float(layer.input.scale_value) * w_scale.astype(np.float64).max() / float(layer.output.scale_value)
            bits = _worst_case_bits(step) + _left_shift(mult)
        elif isinstance(step, MulStep):
            mult = float(step.x_q.scale_value) * float(step.y_q.scale_value) / float(step.quant.scale_value)
            bits = _span_bits(step.x_q) + _span_bits(step.y_q) - 1 + _left_shift(mult)
        elif isinstance(step, AddStep):
            big = max(float(step.x_q.scale_value), float(step.y_q.scale_value))
            mult = 2.0 * big / (2.0 ** GEMMLOWP_ADD_SHIFT * float(step.quant.scale_value))
            bits = INT32_BITS + 1 if mult > 1 else 0
        else:
            continue
        if bits > INT32_BITS:
            risks.append(f"{step.kind} {step.name!r} (multiplier {mult:.3g}, up to {bits} bits before the "
                         "Q31 multiply)")
    return risks
