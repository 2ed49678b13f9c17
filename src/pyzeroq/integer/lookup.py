"""Lookup tables of elementwise activations on activation codes (:class:`pyzeroq.integer.steps.LookupStep`).

An activation ``f`` between two quantized tensors (records ``x_q`` -> ``y_q``, both per tensor,
unsigned, at most :data:`MAX_TABLE_BITS` bits) has finitely many inputs: the 2**bits codes of
``x_q``. Its table, computed once at compile time, is::

    table[q] = clamp(rne(f(f32(s_x * (q - z_x))) / s_y) + z_y, 0, 2**bits_y - 1)

with ``f`` evaluated by torch in float32 on the dequantized codes (``x_q.dequantize``) and the
result quantized by ``y_q.quantize`` (the float32 formula of :mod:`pyzeroq.ops`). The fake-quant
model computes ``f`` on the same float32 values (the output of its input quantizer) and quantizes
with the same ops, so the table reproduces its codes exactly, whatever ``f`` is.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ..qspec import TensorQuant, activation_clamp

__all__ = ["lookup_table", "MAX_TABLE_BITS"]

MAX_TABLE_BITS = 8  # uint8 codes: a table of at most 256 entries


def lookup_table(fn: Callable[[torch.Tensor], torch.Tensor], x_q: TensorQuant, y_q: TensorQuant,
                 activation: Optional[str] = None) -> np.ndarray:
    """uint8 [2**x_q.bits]: ``table[q] = y_q.quantize(fn(x_q.dequantize(q)))`` (module docstring),
    clamped to ``activation_clamp(y_q, activation)`` for a fused ReLU / ReLU6 after ``fn``."""
    if x_q.bits > MAX_TABLE_BITS or y_q.bits > MAX_TABLE_BITS:
        raise ValueError(f"lookup tables map codes of at most {MAX_TABLE_BITS} bits, got {x_q.bits} -> {y_q.bits}")
    codes = np.arange(1 << x_q.bits, dtype=np.uint8)
    real = torch.from_numpy(np.ascontiguousarray(x_q.dequantize(codes), dtype=np.float32))
    with torch.no_grad():
        out = fn(real.clone())  # a copy: in-place activations must not touch ``real``
    out = np.ascontiguousarray(out.detach().cpu().numpy(), dtype=np.float32)
    if out.shape != codes.shape:
        raise ValueError(f"the activation is not elementwise: {codes.shape[0]} codes -> shape {out.shape}")
    table = y_q.quantize(out).astype(np.uint8)
    lo, hi = activation_clamp(y_q, activation)
    return np.clip(table, lo, hi).astype(np.uint8)
