"""The integer model's accumulator report: per conv / linear layer, the accumulator range seen
in the runs since the last reset, the worst case over all input codes, and which register widths
the observed values would overflow."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..qspec import accumulation_extremes
from .steps import Step

__all__ = ["IntegerReport", "REPORT_ACC_BITS"]

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
