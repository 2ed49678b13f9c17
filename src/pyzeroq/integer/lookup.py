"""Lookup tables of elementwise activations on activation codes (:class:`pyzeroq.integer.steps.LookupStep`).

An activation ``f`` between two quantized tensors (records ``x_q`` -> ``y_q``, both per tensor,
at most :data:`MAX_TABLE_BITS` bits) has finitely many inputs: the 2**bits codes of ``x_q``.
Its table, computed once at compile time, is::

    table[q mod 2**bits] = clamp(rne(f(f32(s_x * (q - z_x))) / s_y) + z_y, qmin_y, qmax_y)

Entry ``q mod 2**bits``: unsigned codes index it directly; a signed code ``q < 0`` reads entry
``2**bits + q``, which is where numpy's ``take`` and ONNX ``Gather`` look for a negative index, so
``table[x]`` needs no offset on signed codes either.

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

MAX_TABLE_BITS = 8  # 8-bit codes: a table of at most 256 entries


def lookup_table(fn: Callable[[torch.Tensor], torch.Tensor], x_q: TensorQuant, y_q: TensorQuant,
                 activation: Optional[str] = None) -> np.ndarray:
    """[2**x_q.bits] codes of ``y_q``'s dtype (uint8 / int8): ``table[q mod 2**bits] =
    y_q.quantize(fn(x_q.dequantize(q)))`` (module docstring), clamped to ``activation_clamp(y_q,
    activation)`` for a fused ReLU / ReLU6 after ``fn``."""
    if x_q.bits > MAX_TABLE_BITS or y_q.bits > MAX_TABLE_BITS:
        raise ValueError(f"lookup tables map codes of at most {MAX_TABLE_BITS} bits, got {x_q.bits} -> {y_q.bits}")
    index = np.arange(1 << x_q.bits)
    codes = np.where(index > x_q.qmax, index - (1 << x_q.bits), index).astype(x_q.code_dtype)  # code of entry
    real = torch.from_numpy(np.ascontiguousarray(x_q.dequantize(codes), dtype=np.float32))
    with torch.no_grad():
        out = fn(real.clone())  # a copy: in-place activations must not touch ``real``
    out = np.ascontiguousarray(out.detach().cpu().numpy(), dtype=np.float32)
    if out.shape != codes.shape:
        raise ValueError(f"the activation is not elementwise: {codes.shape[0]} codes -> shape {out.shape}")
    lo, hi = activation_clamp(y_q, activation)
    return np.clip(y_q.quantize(out), lo, hi).astype(y_q.code_dtype)
