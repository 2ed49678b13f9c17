"""Compilation of a quantized fx graph into a list of integer steps (:class:`Step`): the plan that
:class:`pyzeroq.integer.convert.IntegerModel` runs and :mod:`pyzeroq.export` writes as ONNX).

:class:`_Compiler` walks the fx graph of a :class:`pyzeroq.quantize.QuantizedModel` (BN already
folded by the surgery); each node maps to one step:

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
final QuantLinear (logits)  ``matmul_integer``: int32 accumulator ``bias + sum((a - za) * (w - zw))``
                            under the same ``acc_bits`` / ``overflow`` model, dequantized to float32 logits
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

__all__ = ["QParams", "Step"]

MAX_ACT_BITS = 8
MAX_WEIGHT_BITS = 8
MIN_BITS = 2
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
RELU6_MAX = 6.0
RELU_FUNCS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
FLATTEN_METHODS = ("flatten", "view", "reshape")


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
        rec = layer.weight_quant.record()
        scale, zp = rec.scale.reshape(-1), rec.zero_point.astype(np.int64).reshape(-1)
        codes = rec.quantize(w)
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
