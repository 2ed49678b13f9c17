"""Quantized model -> integer-only model running on the C++ integer simulator.

:func:`to_integer` compiles the fx graph of a :class:`pyzeroq.quantize.QuantizedModel` into a
list of integer steps (:mod:`pyzeroq.integer.plan`, whose docstring has the node -> step
mapping) and returns an :class:`IntegerModel` that runs them on :mod:`pyzeroq.integer.simulate`
(codes are uint8, accumulators int32; the logits are the only float op).

Differences from the fake-quantized model are float-rounding effects only: the fake-quant
model rounds ``f32(conv output) / y_scale`` where the integer model rounds
``f32(acc) * f32(f32(x_scale * w_scale) / y_scale)``; values that sit within a few float32
ulps of a rounding tie may land on the neighbouring code. Residual adds (``float32_rne``)
use the same float formula as the fake-quant model and agree exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .. import ops
from . import simulate as sim
from .plan import (  # noqa: F401  (re-exported for existing imports)
    FLATTEN_METHODS,
    INT32_MAX,
    INT32_MIN,
    MAX_ACT_BITS,
    MAX_WEIGHT_BITS,
    MIN_BITS,
    RELU6_MAX,
    RELU_FUNCS,
    QParams,
    Step,
    _code_of,
    _Compiler,
    _conv_padding,
    _f32,
    _pair,
    _qparams,
    _relu_clamp,
    _target_name,
)

__all__ = ["to_integer", "IntegerModel", "IntegerReport", "AccumulatorOverflowError", "Step", "QParams"]

PIXEL_LEVELS = 256
PIXEL_MAX = 255.0
REPORT_ACC_BITS = (8, 12, 16, 24)  # accumulator widths the report checks
ROUNDINGS = ("float32_rne", "gemmlowp", "dyadic")
OVERFLOWS = ("wrap", "saturate", "error")


class AccumulatorOverflowError(ValueError):
    """An accumulator exceeded ``acc_bits`` with ``overflow="error"``; names the layer."""


def _input_lut(normalize: Optional[nn.Module], q: QParams) -> np.ndarray:
    """[C or 1, 256] uint8: pixel code p -> activation code of the float image p / 255."""
    pixels = torch.arange(PIXEL_LEVELS, dtype=torch.uint8).float() / PIXEL_MAX
    if normalize is None:
        return ops.quantize(pixels.numpy(), q.scale, q.zero_point, q.bits)[None]
    channels = normalize.mean.numel()
    with torch.no_grad():
        y = normalize(pixels.reshape(1, 1, PIXEL_LEVELS, 1).expand(1, channels, PIXEL_LEVELS, 1).contiguous())
    return ops.quantize(y.reshape(channels, PIXEL_LEVELS).contiguous().numpy(), q.scale, q.zero_point, q.bits)


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
    """Bits of the largest accumulator any input codes could produce."""
    xq = step.in_q[0]
    w = step.attrs["w"].reshape(step.attrs["w"].shape[0], -1).astype(np.int64) - step.attrs["w_zp"][:, None]
    bias = step.attrs["bias"] if step.attrs["bias"] is not None else np.zeros(w.shape[0], np.int64)
    pos = np.where(w > 0, w, 0).sum(1) * (xq.qmax - xq.zero_point) + np.where(w < 0, -w, 0).sum(1) * xq.zero_point
    neg = np.where(w > 0, w, 0).sum(1) * xq.zero_point + np.where(w < 0, -w, 0).sum(1) * (xq.qmax - xq.zero_point)
    return _bits_for(int((bias - neg).min()), int((bias + pos).max()))


@contextmanager
def _naming_layer(step: Step):
    """The simulator's overflow="error" ValueError as an AccumulatorOverflowError naming the layer."""
    try:
        yield
    except ValueError as exc:
        if "accumulator overflow" in str(exc):
            raise AccumulatorOverflowError(f"layer {step.name!r}: {exc}") from exc
        raise


def _final_accumulator(a: np.ndarray, step: Step, acc_bits: int, overflow: str):
    """int32 accumulator of the logits layer (``sim.matmul_integer``: the simulator's
    acc_bits / overflow model). Returns (acc int32 [.., O], AccStats)."""
    at, xq = step.attrs, step.in_q[0]
    with _naming_layer(step):
        return sim.matmul_integer(a, xq.zero_point, np.ascontiguousarray(at["w"].T), at["w_zp"], at["bias"],
                                  acc_bits, overflow)


class IntegerModel:
    """Integer-only model: ``int_model(x)`` -> float32 logits.

    ``x``: float images [N, C, H, W] (values in [0, 1]; the model's Normalize runs in float
    and the result is quantized at the boundary, as in the fake-quant model) or uint8 pixels
    [N, C, H, W] (a 256-entry table maps pixel codes to the first activation codes: no float
    op at all before the logits). torch in -> torch out, numpy in -> numpy out.

    Set ``trace = True`` to record, per executed step, its input / output dtypes in
    ``trace_log`` (list of dicts).
    """

    def __init__(self, steps: list, output: str, rounding: str, acc_bits: int, overflow: str,
                 folded_bn: dict, bit_widths: dict):
        self.steps = steps
        self.output = output
        self.rounding = rounding
        self.acc_bits = acc_bits
        self.overflow = overflow
        self.folded_bn = dict(folded_bn)
        self.bit_widths = dict(bit_widths)
        inp = steps[0]
        self.input_q = inp.out_q
        self._normalize = inp.attrs["normalize"]
        self.input_lut = _input_lut(self._normalize, inp.out_q)
        self.trace = False
        self.trace_log: list = []
        self._bound = {s.name: _worst_case_bits(s) for s in steps if s.kind in ("conv", "linear", "linear_out")}
        self.reset_stats()

    # ----------------------------------------------------------------- stats
    def reset_stats(self) -> None:
        self._stats = {s.name: {"min": 0, "max": 0, "overflows": 0, "op": s.kind} for s in self.steps
                       if s.kind in ("conv", "linear", "linear_out")}
        self._images = 0

    def _record(self, name: str, st: sim.AccStats) -> None:
        rec = self._stats[name]
        rec["min"], rec["max"] = min(rec["min"], st.min_acc), max(rec["max"], st.max_acc)
        rec["bits"] = _bits_for(rec["min"], rec["max"])
        rec["overflows"] += st.overflow_count

    def report(self, x=None) -> IntegerReport:
        """Accumulator ranges per layer over the inputs run so far (or over ``x``, run now)."""
        if x is not None:
            self.reset_stats()
            self(x)
        if not self._images:
            raise ValueError("no inputs have been run yet: call int_model(x) first or pass x to report(x)")
        rows = []
        for name, rec in self._stats.items():
            bits = rec.get("bits", 1)
            row = {"layer": name, "op": rec["op"], "max_abs_acc": max(rec["max"], -rec["min"]),
                   "bits_needed": bits, "bound_bits": self._bound[name], "overflows": rec["overflows"]}
            row.update({f"overflow_int{b}": bits > b for b in REPORT_ACC_BITS})
            rows.append(row)
        return IntegerReport(self.acc_bits, self.overflow, self.rounding, self._images, rows, self.folded_bn)

    # ----------------------------------------------------------------- run
    def input_codes(self, x) -> np.ndarray:
        """Boundary: the first activation's uint8 codes for float images or uint8 pixels."""
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"x must be a numpy array or a torch tensor, got {type(x).__name__}")
        if arr.ndim != 4:
            raise ValueError(f"x must have shape [N, C, H, W], got shape {tuple(arr.shape)}")
        q = self.input_q
        if arr.dtype == np.uint8:
            lut = self.input_lut
            if lut.shape[0] not in (1, arr.shape[1]):
                raise ValueError(f"x has {arr.shape[1]} channels, the input normalization has {lut.shape[0]}")
            rows = np.arange(arr.shape[1]).reshape(1, -1, 1, 1) if lut.shape[0] > 1 else 0
            return np.ascontiguousarray(lut[rows, arr])
        if arr.dtype.kind != "f":
            raise TypeError(f"x must be float images in [0, 1] or uint8 pixels, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError("x contains NaN or Inf")
        if self._normalize is not None:
            with torch.no_grad():
                arr = self._normalize(torch.from_numpy(arr)).contiguous().numpy()
        return ops.quantize(arr, q.scale, q.zero_point, q.bits)

    def run(self, x) -> dict:
        """All value slots (fx node name -> codes / logits) for input ``x``."""
        env = {self.steps[0].output: self.input_codes(x)}
        if self.trace:
            self.trace_log = [{"step": self.steps[0].name, "op": "input",
                               "inputs": [_dtype_name(x)],
                               "output": str(env[self.steps[0].output].dtype)}]
        for step in self.steps[1:]:
            args = [env[s] for s in step.inputs]
            out = self._exec(step, args)
            env[step.output] = out
            if self.trace:
                self.trace_log.append({"step": step.name, "op": step.kind, "inputs": [str(a.dtype) for a in args],
                                       "output": str(out.dtype)})
        self._images += len(env[self.steps[0].output])
        return env

    def __call__(self, x):
        out = self.run(x)[self.output]
        return torch.from_numpy(out) if isinstance(x, torch.Tensor) else out

    def predict(self, x) -> np.ndarray:
        return np.asarray(self.run(x)[self.output]).argmax(-1)

    def _exec(self, step: Step, args: list):
        at, x = step.attrs, args[0]
        yq = step.out_q
        kw = dict(rounding=self.rounding)
        if step.kind in ("conv", "linear"):
            xq = step.in_q[0]
            with _naming_layer(step):
                if step.kind == "conv":
                    y, st = sim.qlinear_conv2d(x, xq.scale, xq.zero_point, at["w"], at["w_scale"], at["w_zp"],
                                               yq.scale, yq.zero_point, at["bias"], at["stride"], at["padding"],
                                               at["dilation"], at["groups"], out_bits=yq.bits, acc_bits=self.acc_bits,
                                               overflow=self.overflow, relu=at["relu"], **kw)
                else:
                    y, st = sim.qlinear_matmul(x, xq.scale, xq.zero_point, np.ascontiguousarray(at["w"].T),
                                               at["w_scale"], at["w_zp"], yq.scale, yq.zero_point, at["bias"],
                                               out_bits=yq.bits, acc_bits=self.acc_bits, overflow=self.overflow,
                                               relu=at["relu"], **kw)
            self._record(step.name, st)
            return _clamp_hi(y, at["clamp_hi"])
        if step.kind == "linear_out":
            acc, st = _final_accumulator(x, step, self.acc_bits, self.overflow)
            self._record(step.name, st)
            if self.trace:
                self.trace_log.append({"step": step.name, "op": "accumulate", "inputs": [str(x.dtype)],
                                       "output": str(acc.dtype)})
            return acc.astype(np.float32) * at["dequant"]  # the only float op: logits
        if step.kind == "add":
            a, b = step.in_q
            y = sim.qadd(x, a.scale, a.zero_point, args[1], b.scale, b.zero_point, yq.scale, yq.zero_point,
                         relu=at["relu"], out_bits=yq.bits, **kw)
            return _clamp_hi(y, at["clamp_hi"])
        if step.kind == "global_avg_pool":
            xq = step.in_q[0]
            y = sim.global_avg_pool2d(x, xq.scale, xq.zero_point, yq.scale, yq.zero_point, out_bits=yq.bits, **kw)
            return self._pool_relu(y, at["relu"], yq)
        if step.kind == "avg_pool":
            xq, (kh, kw_) = step.in_q[0], at["kernel"]
            ones = np.ones((x.shape[1], 1, kh, kw_), np.uint8)
            y, _ = sim.qlinear_conv2d(x, _f32(_f32(xq.scale) / _f32(yq.scale)), xq.zero_point, ones, 1.0, 0,
                                      float(kh * kw_), yq.zero_point, None, at["stride"], at["padding"], 1,
                                      x.shape[1], out_bits=yq.bits, **kw)
            return self._pool_relu(y, at["relu"], yq)
        if step.kind == "max_pool":
            xq = step.in_q[0]
            y = sim.max_pool2d(x, at["kernel"], at["stride"], at["padding"])
            if xq != yq:
                y = sim.requantize((y.astype(np.int32) - np.int32(xq.zero_point)), _f32(_f32(xq.scale) / _f32(yq.scale)),
                                   yq.zero_point, out_bits=yq.bits, **kw)
            return self._pool_relu(y, at["relu"], yq)
        if step.kind == "requant":
            xq = step.in_q[0]
            return sim.requantize(x.astype(np.int32) - np.int32(xq.zero_point), at["multiplier"], yq.zero_point,
                                  out_bits=yq.bits, **kw)
        if step.kind == "clamp":
            y = np.maximum(x, np.asarray(at["lo"], x.dtype))
            return _clamp_hi(y, at["hi"])
        if step.kind == "reshape":
            return _reshape(x, at["spec"])
        raise AssertionError(f"unknown step kind {step.kind}")  # internal invariant

    @staticmethod
    def _pool_relu(y, relu, yq):
        if relu is None:
            return y
        r, hi = _relu_clamp(relu, yq)
        return _clamp_hi(np.maximum(y, np.asarray(yq.zero_point, y.dtype)), hi)


def _dtype_name(x) -> str:
    if isinstance(x, torch.Tensor):
        return str(x.numpy().dtype) if x.device.type == "cpu" else str(x.dtype)
    return str(np.asarray(x).dtype)


def _clamp_hi(y: np.ndarray, hi: Optional[int]) -> np.ndarray:
    return y if hi is None else np.minimum(y, np.asarray(hi, y.dtype))


def _reshape(x: np.ndarray, spec: tuple) -> np.ndarray:
    if spec[0] == "flatten":
        start, end = spec[1] % x.ndim, spec[2] % x.ndim
        return x.reshape(x.shape[:start] + (-1,) + x.shape[end + 1:])
    return x.reshape([x.shape[0] if d == "batch" else d for d in spec[1]])


def to_integer(qmodel, rounding: str = "float32_rne", acc_bits: int = 32, overflow: str = "wrap") -> IntegerModel:
    """Integer-only model of a quantized model (see the module docstring for the mapping).

    ``rounding``: requantization mode of every conv / linear / add / pool ("float32_rne"
    matches onnxruntime and the fake-quant model best; "gemmlowp" TFLite; "dyadic" HAWQ-V3).
    ``acc_bits`` / ``overflow``: accumulator register model of the conv / linear layers
    ("error" raises :class:`AccumulatorOverflowError` naming the layer and the bits needed).
    """
    gm = getattr(qmodel, "graph_module", None)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"qmodel must be a QuantizedModel returned by pyzeroq.quantize, got {type(qmodel).__name__}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow must be one of {OVERFLOWS}, got {overflow!r}")
    if not isinstance(acc_bits, (int, np.integer)) or not MIN_BITS <= acc_bits <= 32:
        raise ValueError(f"acc_bits must be an int in [{MIN_BITS}, 32], got {acc_bits!r}")
    report = getattr(qmodel, "report", None)
    float_ops = list(getattr(report, "float_ops", []) or [])
    if float_ops:
        raise ValueError(f"the quantized model keeps float ops that have no integer form: {float_ops}")
    comp = _Compiler(gm, getattr(qmodel, "bit_widths", {}))
    steps = comp.compile()
    if comp.output is None:
        raise ValueError("the graph has no output")
    return IntegerModel(steps, comp.output, rounding, int(acc_bits), overflow,
                        getattr(report, "folded_bn", {}) or {}, comp.bit_widths)
