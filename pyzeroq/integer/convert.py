"""Quantized model -> integer-only model running on the C++ integer simulator.

:func:`to_integer` walks the fx graph of a :class:`pyzeroq.quantize.QuantizedModel`
(BN already folded by the surgery) and compiles it into a list of integer steps:

==========================  ===================================================================
graph node                  integer step (codes are uint8, accumulators int32)
==========================  ===================================================================
input [+ Normalize] + act   boundary: float images -> Normalize (float) -> QuantizeLinear codes,
                            or uint8 pixels -> 256-entry lookup table (integer only)
QuantConv2d [+ReLU(6)] +act ``qlinear_conv2d``: per-channel weight codes, int32 bias
                            ``round(b / (x_scale * w_scale[c]))``, requantized to the next
                            QuantAct; ReLU = clamp at the zero point, ReLU6 = clamp at the code
                            of 6.0 (exact: quantization is monotone)
QuantLinear [+ReLU] + act   ``qlinear_matmul`` (same as conv)
final QuantLinear (logits)  exact int32 accumulator ``bias + sum((a - za) * (w - zw))`` under the
                            same ``acc_bits`` / ``overflow`` model, dequantized to float32 logits
                            ``f32(acc) * f32(x_scale * w_scale[c])`` -- the only float op
add [+ReLU] + act           ``qadd`` (two scales, requantized)
AdaptiveAvgPool2d(1) + act  ``global_avg_pool2d`` (exact sum, one requantization)
AvgPool2d + act             ``qlinear_conv2d`` with all-ones depthwise weights: exact window sum,
                            one requantization with ``M = f32(f32(sx / sy) / f32(kh * kw))``
                            (the global pool's formula; zero-point padding = count_include_pad)
MaxPool2d + act             ``max_pool2d`` on codes, then ``requantize`` with ``M = f32(sx / sy)``
flatten / view / reshape    reshape of the codes
Identity / Dropout          nothing
==========================  ===================================================================

Differences from the fake-quantized model are float-rounding effects only: the fake-quant
model rounds ``f32(conv output) / y_scale`` where the integer model rounds
``f32(acc) * f32(f32(x_scale * w_scale) / y_scale)``; values that sit within a few float32
ulps of a rounding tie may land on the neighbouring code. Residual adds (``float32_rne``)
use the same float formula as the fake-quant model and agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..modules import ADD_FUNCTIONS, QuantAct, QuantConv2d, QuantLinear, _is_normalizer
from . import simulate as sim

__all__ = ["to_integer", "IntegerModel", "IntegerReport", "AccumulatorOverflowError", "Step", "QParams"]

MAX_ACT_BITS = 8
MAX_WEIGHT_BITS = 8
MIN_BITS = 2
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
RELU6_MAX = 6.0
PIXEL_LEVELS = 256
PIXEL_MAX = 255.0
REPORT_ACC_BITS = (8, 12, 16, 24)  # accumulator widths the report checks
ROUNDINGS = ("float32_rne", "gemmlowp", "dyadic")
OVERFLOWS = ("wrap", "saturate", "error")
RELU_FUNCS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
FLATTEN_METHODS = ("flatten", "view", "reshape")


class AccumulatorOverflowError(ValueError):
    """An accumulator exceeded ``acc_bits`` with ``overflow="error"``; names the layer."""


@dataclass(frozen=True)
class QParams:
    """Per-tensor quantization of an activation: real = scale * (code - zero_point)."""

    scale: float  # a float32 value
    zero_point: int
    bits: int

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


@dataclass
class Step:
    """One integer operation of the compiled plan. ``inputs`` / ``output`` name value slots
    (fx node names); ``out_q`` is the quantization of the output codes (None: float logits)."""

    kind: str
    name: str
    inputs: tuple
    output: str
    in_q: tuple
    out_q: Optional[QParams]
    attrs: dict = field(default_factory=dict)


def _f32(v) -> np.float32:
    return np.float32(v)


def _qparams(qa: QuantAct, name: str) -> QParams:
    if qa.mode != "quantize" or qa.bits is None:
        raise ValueError(f"activation quantizer {name!r} is not quantizing (mode={qa.mode!r}); "
                         "to_integer needs act_bits set and a calibrated model")
    if not MIN_BITS <= qa.bits <= MAX_ACT_BITS:
        raise ValueError(f"activation quantizer {name!r} has {qa.bits} bits; the integer simulator "
                         f"supports {MIN_BITS}..{MAX_ACT_BITS}-bit activations")
    return QParams(float(_f32(qa.scale.item())), int(qa.zero_point.item()), int(qa.bits))


def _code_of(value: float, q: QParams) -> int:
    """Code of a real value with the float formula of the fake quantizer."""
    return int(ops.quantize(np.array([value], np.float32), q.scale, q.zero_point, q.bits)[0])


def _relu_clamp(kind: Optional[str], q: QParams) -> tuple[bool, Optional[int]]:
    """(clamp at zero point, upper code clamp) for a fused ReLU / ReLU6."""
    if kind is None:
        return False, None
    if kind == "relu6":
        hi = _code_of(RELU6_MAX, q)
        return True, (hi if hi < q.qmax else None)
    return True, None


class _Compiler:
    def __init__(self, gm: fx.GraphModule, bit_widths: dict):
        self.gm = gm
        self.bit_widths = bit_widths
        self.steps: list[Step] = []
        self.q: dict[str, QParams] = {}     # slot -> quantization of its codes
        self.alias: dict[str, str] = {}     # node name -> slot it reads
        self.absorbed: set[str] = set()     # nodes folded into an earlier step
        self.float_nodes: set[str] = set()  # placeholder / normalize prefix
        self.normalize: Optional[nn.Module] = None
        self.placeholder: Optional[str] = None
        self.output: Optional[str] = None
        self.final_layer: Optional[str] = None

    # ----------------------------------------------------------------- helpers
    def mod(self, node: fx.Node):
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def relu_kind(self, node: fx.Node) -> Optional[str]:
        m = self.mod(node)
        if isinstance(m, nn.ReLU6):
            return "relu6"
        if isinstance(m, nn.ReLU):
            return "relu"
        if node.op == "call_function" and node.target in RELU_FUNCS:
            return RELU_FUNCS[node.target]
        return None

    def is_act(self, node: fx.Node) -> bool:
        return isinstance(self.mod(node), QuantAct)

    def slot(self, node: Any, who: fx.Node) -> str:
        if not isinstance(node, fx.Node):
            raise ValueError(f"node {who.name!r}: expected a tensor input, got {node!r}")
        name = self.alias.get(node.name, node.name)
        if name in self.float_nodes or name not in self.q:
            raise ValueError(f"node {who.name!r} ({who.op} {_target_name(who)}) reads {node.name!r}, "
                             "which is not an integer activation (no QuantAct before it)")
        return name

    def target(self, node: fx.Node):
        """(QuantAct node, relu kind) quantizing ``node``'s output, absorbing them; None if absent."""
        users = list(node.users)
        relu = None
        if len(users) == 1 and self.relu_kind(users[0]) is not None:
            relu, users = users[0], list(users[0].users)
        if len(users) == 1 and self.is_act(users[0]):
            act = users[0]
            self.absorbed.update({act.name} | ({relu.name} if relu is not None else set()))
            self.alias[act.name] = node.name
            if relu is not None:
                self.alias[relu.name] = node.name
            return _qparams(self.mod(act), act.target), (self.relu_kind(relu) if relu is not None else None)
        return None, None

    def require_target(self, node: fx.Node):
        q, relu = self.target(node)
        if q is None:
            raise ValueError(f"node {node.name!r} ({_target_name(node)}): its output is not followed by an "
                             "activation quantizer (QuantAct); only the final Linear may produce float output")
        return q, relu

    def add(self, kind, node, inputs, out_q, **attrs):
        in_q = tuple(self.q[s] for s in inputs)
        self.steps.append(Step(kind, str(node.target) if node.op == "call_module" else node.name,
                               tuple(inputs), node.name, in_q, out_q, attrs))
        if out_q is not None:
            self.q[node.name] = out_q

    # ----------------------------------------------------------------- layers
    def weights(self, node: fx.Node, layer):
        name = str(node.target)
        bits = layer.weight_bits
        if bits is None:
            raise ValueError(f"layer {name!r} has float weights (weight_bits=None); to_integer needs quantized weights")
        if not MIN_BITS <= bits <= MAX_WEIGHT_BITS:
            raise ValueError(f"layer {name!r} has {bits}-bit weights; the simulator supports "
                             f"{MIN_BITS}..{MAX_WEIGHT_BITS}-bit weight codes")
        w = layer.weight.detach().cpu().float().contiguous().numpy()
        scale, zp = layer.weight_params(bits)
        scale, zp = np.asarray(scale, np.float32).reshape(-1), np.asarray(zp, np.int64).reshape(-1)
        codes = ops.quantize(w, scale, zp, bits, axis=0 if scale.size > 1 else None)
        out = w.shape[0]
        return codes, np.broadcast_to(scale, (out,)).copy(), np.broadcast_to(zp, (out,)).copy(), bits

    def bias(self, layer, x_q: QParams, w_scale: np.ndarray) -> Optional[np.ndarray]:
        """int32 bias exactly as QuantLinear/QuantConv2d.quantized_bias rounds it."""
        if layer.bias is None:
            return None
        bias_scale = torch.tensor(x_q.scale, dtype=torch.float32) * torch.from_numpy(w_scale)
        codes = torch.round(layer.bias.detach().cpu().float() / bias_scale).double()
        return np.clip(codes.numpy(), INT32_MIN, INT32_MAX).astype(np.int32)

    def layer(self, node: fx.Node, layer):
        x = self.slot(node.args[0], node)
        x_q = self.q[x]
        codes, w_scale, w_zp, bits = self.weights(node, layer)
        common = dict(w=codes, w_scale=w_scale, w_zp=w_zp, w_bits=bits, bias=self.bias(layer, x_q, w_scale))
        if isinstance(layer, QuantConv2d):
            if layer.padding_mode != "zeros":
                raise ValueError(f"layer {node.target!r}: padding_mode={layer.padding_mode!r} is not supported "
                                 "(zero padding only)")
            out_q, relu = self.require_target(node)
            r, hi = _relu_clamp(relu, out_q)
            self.add("conv", node, [x], out_q, stride=tuple(layer.stride), padding=_conv_padding(layer),
                     dilation=tuple(layer.dilation), groups=int(layer.groups), relu=r, clamp_hi=hi, **common)
            return
        out_q, relu = self.target(node)
        if out_q is not None:
            r, hi = _relu_clamp(relu, out_q)
            self.add("linear", node, [x], out_q, relu=r, clamp_hi=hi, **common)
            return
        users = list(node.users)
        if not (len(users) == 1 and users[0].op == "output"):
            raise ValueError(f"layer {node.target!r}: a Linear without activation quantizer must be the graph "
                             "output (the float logits)")
        deq = (np.float32(x_q.scale) * w_scale).astype(np.float32)
        self.add("linear_out", node, [x], None, dequant=deq, **common)
        self.final_layer = str(node.target)

    def pool(self, node: fx.Node, m):
        x = self.slot(node.args[0], node)
        if isinstance(m, nn.MaxPool2d):
            if m.dilation not in (1, (1, 1)) or m.ceil_mode or m.return_indices:
                raise ValueError(f"node {node.name!r}: MaxPool2d with dilation/ceil_mode/return_indices is not supported")
            out_q, relu = self.require_target(node)
            self.add("max_pool", node, [x], out_q, kernel=m.kernel_size, stride=m.stride or m.kernel_size,
                     padding=m.padding, relu=relu)
            return
        if isinstance(m, nn.AdaptiveAvgPool2d):
            size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
            if tuple(size) != (1, 1):
                raise ValueError(f"node {node.name!r}: AdaptiveAvgPool2d({m.output_size}) is not supported "
                                 "(only output size 1, the global average pool)")
            out_q, relu = self.require_target(node)
            self.add("global_avg_pool", node, [x], out_q, relu=relu)
            return
        pad = _pair(m.padding)
        if m.ceil_mode or m.divisor_override is not None or (any(pad) and not m.count_include_pad):
            raise ValueError(f"node {node.name!r}: AvgPool2d with ceil_mode, divisor_override or padding "
                             "without count_include_pad is not supported")
        out_q, relu = self.require_target(node)
        self.add("avg_pool", node, [x], out_q, kernel=_pair(m.kernel_size), stride=_pair(m.stride or m.kernel_size),
                 padding=pad, relu=relu)

    def reshape(self, node: fx.Node):
        x = node.args[0]
        if node.op == "call_module":  # nn.Flatten
            m = self.mod(node)
            spec = ("flatten", m.start_dim, m.end_dim)
        elif node.op == "call_function" or node.target == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            spec = ("flatten", int(start), int(end))
        else:  # view / reshape: ints and x.size(0)
            dims = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list)) else node.args[1]
            shape = []
            for d in dims:
                if isinstance(d, int):
                    shape.append(d)
                elif isinstance(d, fx.Node) and d.op == "call_method" and d.target == "size" and \
                        tuple(d.args[1:]) == (0,):
                    shape.append("batch")
                else:
                    raise ValueError(f"node {node.name!r}: .{node.target}() with shape argument {d!r} is not supported")
            spec = ("shape", tuple(shape))
        src = self.slot(x, node)
        self.add("reshape", node, [src], self.q[src], spec=spec)

    # ----------------------------------------------------------------- walk
    def compile(self):
        for node in self.gm.graph.nodes:
            if node.name in self.absorbed:
                continue
            m = self.mod(node)
            if node.op == "placeholder":
                if self.placeholder is not None:
                    raise ValueError(f"node {node.name!r}: the integer model takes exactly one input")
                self.placeholder = node.name
                self.float_nodes.add(node.name)
            elif m is not None and _is_normalizer(m):
                if not (isinstance(node.args[0], fx.Node) and node.args[0].name == self.placeholder):
                    raise ValueError(f"node {node.name!r}: input normalization must be applied to the model input")
                self.normalize = m
                self.float_nodes.add(node.name)
            elif isinstance(m, QuantAct):
                q = _qparams(m, node.target)
                src = node.args[0]
                if isinstance(src, fx.Node) and src.name in self.float_nodes:
                    if self.steps:
                        raise ValueError(f"node {node.name!r}: a second float-to-integer boundary")
                    self.steps.append(Step("input", str(node.target), (), node.name, (), q,
                                           {"normalize": self.normalize}))
                    self.q[node.name] = q
                else:  # a standalone requantization
                    x = self.slot(src, node)
                    mult = np.float32(np.float32(self.q[x].scale) / np.float32(q.scale))
                    self.add("requant", node, [x], q, multiplier=mult)
            elif isinstance(m, (QuantConv2d, QuantLinear)):
                self.layer(node, m)
            elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d)):
                self.pool(node, m)
            elif isinstance(m, (nn.Identity, nn.Dropout)):
                self.alias[node.name] = self.slot(node.args[0], node)
            elif isinstance(m, nn.Flatten) or (node.op == "call_function" and node.target is torch.flatten) or \
                    (node.op == "call_method" and node.target in FLATTEN_METHODS):
                self.reshape(node)
            elif self.relu_kind(node) is not None:
                self.standalone_relu(node)
            elif node.op == "call_function" and node.target in ADD_FUNCTIONS:
                if len(node.args) != 2 or node.kwargs:
                    raise ValueError(f"node {node.name!r}: add with extra arguments (alpha, out) is not supported")
                a, b = (self.slot(v, node) for v in node.args)
                out_q, relu = self.require_target(node)
                r, hi = _relu_clamp(relu, out_q)
                self.add("add", node, [a, b], out_q, relu=r, clamp_hi=hi)
            elif node.op == "call_method" and node.target == "size":
                pass  # only consumed by view/reshape (checked there)
            elif node.op == "output":
                res = node.args[0]
                if not (isinstance(res, fx.Node) and res.op == "call_module" and str(res.target) == self.final_layer):
                    raise ValueError(f"graph output {res!r} is not the final Linear layer's logits; "
                                     "to_integer needs a model ending in a Linear layer")
                self.output = res.name
            else:
                raise ValueError(f"unsupported graph node {node.name!r} ({node.op} {_target_name(node)}) "
                                 "for integer-only inference")
        if not self.steps or self.steps[0].kind != "input":
            raise ValueError("the model input is not quantized by an activation quantizer (QuantAct)")
        return self.steps

    def standalone_relu(self, node: fx.Node):
        x = self.slot(node.args[0], node)
        q = self.q[x]
        hi = None
        if self.relu_kind(node) == "relu6":
            hi = _code_of(RELU6_MAX, q)
            if hi < q.qmax and float(_f32(q.scale) * _f32(hi - q.zero_point)) != RELU6_MAX:
                raise ValueError(f"node {node.name!r}: a ReLU6 that is not followed by an activation quantizer "
                                 "is exact only when 6.0 is a code; fuse it (conv -> ReLU6 -> QuantAct)")
            hi = hi if hi < q.qmax else None
        self.add("clamp", node, [x], q, lo=q.zero_point, hi=hi)


def _target_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _pair(v) -> tuple:
    return tuple(int(e) for e in v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _conv_padding(conv: nn.Conv2d) -> tuple:
    """(top, left, bottom, right)."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        tot = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return (tot[0] // 2, tot[1] // 2, tot[0] - tot[0] // 2, tot[1] - tot[1] // 2)
    ph, pw = _pair(conv.padding)
    return (ph, pw, ph, pw)


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


def _final_accumulator(a: np.ndarray, step: Step, acc_bits: int, overflow: str):
    """Exact int32 accumulator of the logits layer with the simulator's acc_bits model.
    Returns (acc int32 [.., O], min, max, overflow count)."""
    at, wq = step.attrs, step.in_q[0]
    a64 = a.astype(np.int64) - wq.zero_point
    w64 = at["w"].astype(np.int64) - at["w_zp"][:, None]  # [O, K]
    bias = at["bias"].astype(np.int64) if at["bias"] is not None else np.zeros(w64.shape[0], np.int64)
    exact = a64 @ w64.T + bias
    lo, hi = -(1 << (acc_bits - 1)), (1 << (acc_bits - 1)) - 1
    out_of_range = (exact < lo) | (exact > hi)
    if overflow == "saturate":
        acc = np.broadcast_to(np.clip(bias, lo, hi), exact.shape).copy()
        hit = np.broadcast_to((bias < lo) | (bias > hi), exact.shape).copy()
        for k in range(w64.shape[1]):  # bias, then k: the simulator's order
            s = acc + a64[..., k:k + 1] * w64[:, k]
            hit |= (s < lo) | (s > hi)
            acc = np.clip(s, lo, hi)
        count = int(hit.sum())
    else:
        acc = ((exact - lo) & ((1 << acc_bits) - 1)) + lo  # two's complement wrap
        count = int(out_of_range.sum())
    mn = int(exact.min()) if exact.size else 0
    mx = int(exact.max()) if exact.size else 0
    if overflow == "error" and count:
        raise AccumulatorOverflowError(
            f"layer {step.name!r}: accumulator overflow: {count} accumulator values exceed acc_bits={acc_bits}; "
            f"bits needed: {_bits_for(mn, mx)} (max |acc| = {max(-mn, mx, 0)})")
    return acc.astype(np.int32), mn, mx, count


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

    def _record(self, name: str, st) -> None:
        rec = self._stats[name]
        if isinstance(st, sim.AccStats):  # the kernel gives max |acc| only
            rec["max"] = max(rec["max"], st.max_abs_acc)
            rec["bits"] = max(rec.get("bits", 1), st.bits_needed)
        else:
            rec["min"], rec["max"] = min(rec["min"], st[0]), max(rec["max"], st[1])
            rec["bits"] = max(rec.get("bits", 1), _bits_for(st[0], st[1]))
        rec["overflows"] += st.overflow_count if isinstance(st, sim.AccStats) else st[2]

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
            try:
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
            except ValueError as exc:
                if "accumulator overflow" in str(exc):
                    raise AccumulatorOverflowError(f"layer {step.name!r}: {exc}") from exc
                raise
            self._record(step.name, st)
            return _clamp_hi(y, at["clamp_hi"])
        if step.kind == "linear_out":
            acc, mn, mx, count = _final_accumulator(x, step, self.acc_bits, self.overflow)
            self._record(step.name, (mn, mx, count))
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
