"""Compilation of a quantized fx graph into a typed integer plan (:mod:`pyzeroq.integer.steps`):
what :class:`pyzeroq.integer.convert.IntegerModel` runs and :mod:`pyzeroq.export` writes as ONNX.

:func:`compile_plan` walks the fx graph of a quantized model (``QuantizedModel.graph_module``,
BN already folded by the surgery) and maps each node to one step. It *reads* the
quantization records, it does not re-derive them: a conv / linear step carries
``layer.layer_record(name)`` (:class:`pyzeroq.qspec.LayerQuant`: weight codes, int32 bias,
input / output records and the fused clamp ``activation`` the surgery recorded), an
activation carries its QuantAct's ``record()`` (:class:`pyzeroq.qspec.TensorQuant`).

==========================  ===================================================================
graph node                  integer step (codes are uint8, accumulators int32)
==========================  ===================================================================
input [+ Normalize] + act   :class:`InputStep`: float images -> ``(x - mean) / std`` (float32) ->
                            codes; uint8 pixels -> 256-entry lookup table (integer only)
QuantConv2d [+ReLU(6)] +act :class:`ConvStep`: the layer record; ReLU = clamp at the zero point,
(QuantConv1d: the same step over [N, C, 1, L], ``spatial_dims=1``; QuantConvTranspose2d:
the equivalent convolution on the input with zero points inserted, ``upsample``)
                            ReLU6 = clamp at the code of 6.0 (``LayerQuant.clamp_codes``)
QuantLinear [+ReLU] + act   :class:`LinearStep` (same)
final QuantLinear (logits)  :class:`LogitsStep`: int32 accumulator ``bias + sum((a - za) * (w - zw))``
                            dequantized to float32 logits ``f32(acc) * f32(x_scale * w_scale[c])``
                            (a Linear whose only user is the graph output)
graph output                the model's return structure (tensor, tuple, list, dict with string keys):
                            logits as they are, every other tensor's codes through a
                            :class:`DequantStep` (``f32(scale) * (x - zero_point)``)
add [+ReLU] + act           :class:`AddStep` (two scales, requantized)
mul [+ReLU] + act           :class:`MulStep` (two scales, broadcast: squeeze-excite gating)
AdaptiveAvgPool2d(1) + act  :class:`GlobalAvgPoolStep` (exact sum, one requantization; AdaptiveAvgPool1d(1)
                            over [N, C, L] too); also
                            ``x.mean((2, 3))`` / ``torch.mean(x, (-2, -1))`` (keepdim False: then a
                            :class:`ReshapeStep` to [N, C])
AvgPool2d + act             :class:`AvgPoolStep` (exact window sum, one requantization with
                            ``M = f32(f32(sx / sy) / f32(kh * kw))``; zero-point padding =
                            count_include_pad)
MaxPool2d + act             :class:`MaxPoolStep`: max of codes [+ requantization ``M = f32(sx / sy)``]
F.max/avg_pool2d + act      the steps of the equivalent modules (also F.adaptive_avg_pool2d;
                            :func:`pyzeroq.modules.functional_pool`)
QuantAct (standalone)       :class:`RequantStep`
ReLU / ReLU6 (standalone)   :class:`ClampStep` on codes (ReLU6 only where 6.0 is exactly a code)
Hardswish, Hardsigmoid,     :class:`LookupStep`: ``y = table[x]``, the table computed once from the
SiLU, GELU, Sigmoid, Tanh,  two records in float32 (:func:`pyzeroq.integer.lookup.lookup_table`):
LeakyReLU, Hardtanh + act   exact by construction (modules, F.* / torch.* functions, .sigmoid() /
                            .tanh() methods; :func:`pyzeroq.modules.lookup_op`)
torch.cat (any dim) + act   :class:`ConcatStep`: each input requantized to the output record
                            (``M = f32(s_in / s_out)``, as :class:`RequantStep`), then concatenated
flatten / view / reshape    :class:`ReshapeStep`
Identity / Dropout          nothing (an alias of the input slot)
==========================  ===================================================================

Fused clamps: for conv / linear the record's ``activation`` is used as is (the surgery decided
it); the ReLU node and the QuantAct node after the layer are only located (through the
record's output quantizer) to alias their slots. Adds and pools have no layer record: the
compiler fuses a single-user ReLU / ReLU6 followed by a QuantAct (classified by
:func:`pyzeroq.modules.relu_kind`, the surgery's rule) and the step's
``activation`` is clamped by :func:`pyzeroq.integer.steps.activation_clamp`, the rule of
``LayerQuant.clamp_codes``.

Errors: :class:`UnsupportedOperationError` (attributes ``node`` and ``op``) for an op or op
configuration without an integer step, :class:`PlanError` for a graph that is not (fully)
quantized; both are ValueErrors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..layout_ops import is_contiguous, is_shape_node, is_split_source, layout_op, shape_expr
from ..modules import (
    ADD_FUNCTIONS,
    MUL_FUNCTIONS,
    POOL_MODULES,
    QUANT_CONV_TYPES,
    QUANT_LAYER_TYPES,
    QuantAct,
    QuantChannelAffine,
    QuantConv1d,
    QuantConv2d,
    QuantConvTranspose2d,
    functional_pool,
    is_cat,
    is_normalizer,
    lookup_op,
    relu_kind,
)
from ..outputs import tree_map
from ..qspec import RELU6_MAX, TensorQuant
from .lookup import lookup_table
from .steps import (
    AdaptiveAvgPoolStep,
    AddStep,
    AvgPoolStep,
    ClampStep,
    ConcatStep,
    ConvStep,
    DequantStep,
    GlobalAvgPoolStep,
    InputStep,
    LayoutStep,
    LinearStep,
    LogitsStep,
    LookupStep,
    MaxPoolStep,
    MulStep,
    RequantStep,
    ReshapeStep,
    Step,
    check_output_spec,
)
from .support import int_pair, module_blocker

__all__ = ["IntegerPlan", "PlanError", "UnsupportedOperationError", "compile_plan",
           "MIN_BITS", "MAX_ACT_BITS", "MAX_WEIGHT_BITS"]

MIN_BITS = 2
MAX_ACT_BITS = 8
MAX_WEIGHT_BITS = 8
FLATTEN_METHODS = ("flatten", "view", "reshape")
CHANNEL_FROM_END = (3, 2)  # a normalizer's per-channel mean / std: [C, 1, 1] (images) or [C, 1] (signals)


class PlanError(ValueError):
    """The graph cannot be compiled into integer steps. ``node``: the fx node name (or None)."""

    def __init__(self, message: str, node: Optional[str] = None):
        super().__init__(message)
        self.node = node

    def __reduce__(self):
        return type(self), (str(self), self.node)


class UnsupportedOperationError(PlanError):
    """An op, or an op configuration, that has no integer step. ``node``: the fx node name;
    ``op``: the op (module class or function name, e.g. "sigmoid", "AdaptiveAvgPool2d")."""

    def __init__(self, message: str, node: Optional[str] = None, op: Optional[str] = None):
        super().__init__(message, node)
        self.op = op

    def __reduce__(self):
        return type(self), (str(self), self.node, self.op)


@dataclass(frozen=True)
class IntegerPlan:
    """``steps``: tuple of :class:`pyzeroq.integer.steps.Step` in graph order (``steps[0]`` is the
    :class:`InputStep`); ``output``: the value slot of the float32 result, or a structure of slots
    (tuple / list / dict, as the model returns it; :func:`pyzeroq.integer.steps.output_leaves`)."""

    steps: tuple
    output: Any


def compile_plan(gm: fx.GraphModule) -> IntegerPlan:
    """The integer plan of a calibrated, quantized fx graph (see the module docstring).

    Raises :class:`UnsupportedOperationError` / :class:`PlanError` (ValueErrors)."""
    return _Compiler(gm).compile()


def _op_name(node: fx.Node, gm: Optional[fx.GraphModule] = None) -> str:
    if node.op == "call_module" and gm is not None:
        return type(gm.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


class _Compiler:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.steps: list[Step] = []
        self.q: dict[str, TensorQuant] = {}  # slot -> record of its codes
        self.alias: dict[str, str] = {}      # node name -> slot it reads
        self.absorbed: set[str] = set()      # nodes folded into an earlier step
        self.float_nodes: set[str] = set()   # placeholder / normalize prefix
        self.norm: tuple = (None, None)      # per-channel (mean, std) of the input normalization
        self.placeholder: Optional[str] = None
        self.output: Any = None
        self.float_slots: set[str] = set()   # dequantized accumulators (final Linear layers' logits)
        self.dequantized: dict[str, str] = {}  # code slot -> its DequantStep's float slot
        self.act_nodes = {id(self.mod(n)): n for n in gm.graph.nodes if isinstance(self.mod(n), QuantAct)}

    # ----------------------------------------------------------------- helpers
    def mod(self, node: fx.Node):
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def unsupported(self, node: fx.Node, message: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(f"node {node.name!r} ({_op_name(node, self.gm)}): {message}", node.name,
                                         _op_name(node, self.gm))

    def slot(self, node: Any, who: fx.Node) -> str:
        if not isinstance(node, fx.Node):
            raise PlanError(f"node {who.name!r}: expected a tensor input, got {node!r}", who.name)
        name = self.alias.get(node.name, node.name)
        if name in self.float_nodes or name not in self.q:
            raise PlanError(f"node {who.name!r} ({who.op} {_op_name(who)}) reads {node.name!r}, which is not an "
                            "integer activation (no QuantAct before it)", who.name)
        return name

    def add(self, step: Step) -> None:
        self.steps.append(step)
        if step.out_q is not None:
            self.q[step.output] = step.out_q

    def check_act(self, rec: TensorQuant, what: str, node: fx.Node) -> TensorQuant:
        if not MIN_BITS <= rec.bits <= MAX_ACT_BITS:
            raise UnsupportedOperationError(f"{what} has {rec.bits} bits; the integer simulator supports "
                                            f"{MIN_BITS}..{MAX_ACT_BITS}-bit activations", node.name, "QuantAct")
        if rec.per_channel:
            raise UnsupportedOperationError(f"{what}: the integer simulator takes per-tensor activation codes, "
                                            f"got {rec!r}", node.name, "QuantAct")
        return rec

    def act_record(self, node: fx.Node) -> TensorQuant:
        """The validated record of the QuantAct at ``node``."""
        what = f"activation quantizer {node.target!r}"
        try:
            rec = self.mod(node).record()
        except ValueError as exc:
            raise PlanError(f"{what} is not quantizing: {exc}; to_integer needs act_bits set and a calibrated "
                            "model", node.name) from exc
        return self.check_act(rec, what, node)

    def absorb(self, node: fx.Node, nodes: list) -> None:
        for n in nodes:
            self.absorbed.add(n.name)
            self.alias[n.name] = node.name

    def target(self, node: fx.Node) -> tuple[Optional[TensorQuant], Optional[str]]:
        """(record, fused activation) of the [ReLU(6) +] QuantAct after an add / pool, absorbing
        them; (None, None) if absent."""
        users, relu = list(node.users), None
        if len(users) == 1 and relu_kind(self.gm, users[0]) is not None:
            relu, users = users[0], list(users[0].users)
        if len(users) == 1 and isinstance(self.mod(users[0]), QuantAct):
            rec = self.act_record(users[0])
            self.absorb(node, [users[0]] + ([relu] if relu is not None else []))
            return rec, (relu_kind(self.gm, relu) if relu is not None else None)
        return None, None

    def require_target(self, node: fx.Node) -> tuple[TensorQuant, Optional[str]]:
        q, activation = self.target(node)
        if q is None:
            raise PlanError(f"node {node.name!r} ({_op_name(node, self.gm)}): its output is not followed by an "
                            "activation quantizer (QuantAct); only a Linear that returns logits may produce float "
                            "output", node.name)
        return q, activation

    # ----------------------------------------------------------------- walk
    def compile(self) -> IntegerPlan:
        for node in self.gm.graph.nodes:
            if node.name not in self.absorbed:
                self.visit(node)
        if not self.steps or not isinstance(self.steps[0], InputStep):
            raise PlanError("the model input is not quantized by an activation quantizer (QuantAct)")
        if self.output is None:
            raise PlanError("the graph has no output")
        return IntegerPlan(tuple(self.steps), self.output)

    def visit(self, node: fx.Node) -> None:
        m = self.mod(node)
        if node.op == "placeholder":
            if self.placeholder is not None:
                raise self.unsupported(node, "the integer model takes exactly one input")
            self.placeholder = node.name
            self.float_nodes.add(node.name)
        elif m is not None and is_normalizer(m):
            self.normalizer(node, m)
        elif isinstance(m, QuantAct):
            self.quant_act(node)
        elif isinstance(m, QUANT_LAYER_TYPES):
            self.layer(node, m)
        elif isinstance(m, POOL_MODULES):
            self.pool(node, m)
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            self.alias[node.name] = self.slot(node.args[0], node)
        elif isinstance(m, nn.Flatten) or (node.op == "call_function" and node.target is torch.flatten) or \
                (node.op == "call_method" and node.target in FLATTEN_METHODS):
            self.reshape(node)
        elif relu_kind(self.gm, node) is not None:
            self.standalone_relu(node)
        elif lookup_op(self.gm, node) is not None:
            self.lookup(node)
        elif is_shape_node(node) or is_split_source(node):
            pass  # sizes (x.size(), x.shape, their arithmetic): read by the reshapes; chunk / split: by their items
        elif node.op == "call_function" and node.target in ADD_FUNCTIONS + MUL_FUNCTIONS:
            self.add_node(node)
        elif is_cat(node):
            self.concat(node)
        elif node.op != "call_module" and (pool := functional_pool(node)) is not None:
            self.pool(node, *pool)
        elif is_contiguous(node):
            self.alias[node.name] = self.slot(node.args[0], node)
        elif (layout := layout_op(self.gm, node)) is not None:
            self.layout(node, *layout)
        elif node.op == "output":
            self.output = self.output_spec(node.args[0], node)
            check_output_spec(self.output)
        else:
            raise self.unsupported(node, "unsupported graph node for integer-only inference")

    def output_spec(self, res: Any, node: fx.Node):
        """The model's return value with each tensor replaced by its float slot: a final Linear's
        logits as they are, any other activation's codes through a :class:`DequantStep`."""
        try:
            return tree_map(res, fx.Node, lambda leaf: self.output_slot(leaf, node))
        except TypeError as exc:
            raise self.unsupported(node, f"{exc}: the integer model returns tensors (or tuples / lists / dicts "
                                         "of tensors) only") from None

    def output_slot(self, res: fx.Node, node: fx.Node) -> str:
        if res.name in self.float_slots:
            return res.name
        slot = self.slot(res, node)
        if slot not in self.dequantized:
            out = f"{slot}_float"
            self.add(DequantStep(name=out, inputs=(slot,), output=out, x_q=self.q[slot]))
            self.dequantized[slot] = out
        return self.dequantized[slot]

    def normalizer(self, node: fx.Node, m: nn.Module) -> None:
        if not (isinstance(node.args[0], fx.Node) and node.args[0].name == self.placeholder):
            raise self.unsupported(node, "input normalization must be applied to the model input")
        self.norm = tuple(self.channel_values(node, getattr(m, what), what) for what in ("mean", "std"))
        self.float_nodes.add(node.name)

    def channel_values(self, node: fx.Node, t: torch.Tensor, what: str) -> tuple:
        """Per-channel float32 values of a normalizer's ``mean`` / ``std`` (shape [C, 1, 1], [1, C, 1, 1],
        [C, 1] / [1, C, 1] for signals, or one value)."""
        t = t.detach().cpu().float()
        if t.numel() != 1 and not any(t.dim() >= r and t.shape[-r] == t.numel() for r in CHANNEL_FROM_END):
            raise self.unsupported(node, f"input normalization {what} of shape {tuple(t.shape)} is not per channel")
        return tuple(t.reshape(-1).tolist())

    def quant_act(self, node: fx.Node) -> None:
        rec = self.act_record(node)
        src = node.args[0]
        if isinstance(src, fx.Node) and src.name in self.float_nodes:
            if self.steps:
                raise self.unsupported(node, "a second float-to-integer boundary")
            mean, std = self.norm
            self.add(InputStep(name=str(node.target), inputs=(self.placeholder,), output=node.name, quant=rec,
                               mean=mean, std=std))
        else:  # a standalone requantization
            x = self.slot(src, node)
            self.add(RequantStep(name=str(node.target), inputs=(x,), output=node.name, x_q=self.q[x], quant=rec))

    # ----------------------------------------------------------------- layers
    def layer(self, node: fx.Node, layer) -> None:
        name = str(node.target)
        x = self.slot(node.args[0], node)
        if (reason := module_blocker(layer)) is not None:
            raise self.unsupported(node, reason)
        try:
            rec = layer.layer_record(name)
        except ValueError as exc:
            raise PlanError(f"{exc}; to_integer needs quantized weights and inputs", node.name) from exc
        bits = rec.weight.bits
        if not MIN_BITS <= bits <= MAX_WEIGHT_BITS:
            raise UnsupportedOperationError(f"layer {name!r} has {bits}-bit weights; the simulator supports "
                                            f"{MIN_BITS}..{MAX_WEIGHT_BITS}-bit weight codes",
                                            node.name, type(layer).__name__)
        if rec.input != self.q[x]:
            raise PlanError(f"layer {name!r}: its input record {rec.input!r} is not the record of the activation it "
                            f"reads ({x!r}: {self.q[x]!r})", node.name)
        if rec.output is None:
            self.logits(node, rec, x)
            return
        self.check_act(rec.output, f"the output quantizer of layer {name!r}", node)
        self.absorb_output(node, layer, rec.activation)
        if isinstance(layer, QuantConvTranspose2d):
            self.add(ConvStep(name=name, inputs=(x,), output=node.name, layer=rec, stride=(1, 1),
                              padding=self.transpose_padding(node, layer), dilation=tuple(layer.dilation), groups=1,
                              upsample=tuple(layer.transpose_stride)))
        elif isinstance(layer, QuantConv1d):  # as a Conv2d over [N, C, 1, L]; a channel affine over any rank
            self.add(ConvStep(name=name, inputs=(x,), output=node.name, layer=rec, stride=(1, layer.stride[0]),
                              padding=_conv_padding(layer), dilation=(1, layer.dilation[0]), groups=int(layer.groups),
                              spatial_dims=0 if isinstance(layer, QuantChannelAffine) else 1))
        elif isinstance(layer, QuantConv2d):
            self.add(ConvStep(name=name, inputs=(x,), output=node.name, layer=rec, stride=tuple(layer.stride),
                              padding=_conv_padding(layer), dilation=tuple(layer.dilation), groups=int(layer.groups)))
        else:
            self.add(LinearStep(name=name, inputs=(x,), output=node.name, layer=rec))

    def transpose_padding(self, node: fx.Node, layer) -> tuple:
        """(top, left, bottom, right) of the convolution equivalent to a transposed one:
        ``d * (k - 1) - p`` on each side, plus ``output_padding`` at the bottom / right."""
        pads = [d * (k - 1) - p for d, k, p in zip(layer.dilation, layer.kernel_size, layer.transpose_padding)]
        if min(pads) < 0:
            raise self.unsupported(node, "ConvTranspose2d with padding > dilation * (kernel - 1) is not supported")
        return (pads[0], pads[1], pads[0] + layer.output_padding[0], pads[1] + layer.output_padding[1])

    def absorb_output(self, node: fx.Node, layer, activation: Optional[str]) -> None:
        """Alias the [ReLU +] QuantAct nodes after a layer (located by the record's output quantizer)."""
        act = self.act_nodes.get(id(layer.output_quant))
        chain, p = [], act.args[0] if act is not None else None
        while isinstance(p, fx.Node) and p is not node and len(chain) < 2:
            chain.append(p)
            p = p.args[0] if p.args else None
        if act is None or p is not node or len(chain) != (activation is not None) or \
                any(len(n.users) != 1 for n in [node] + chain):
            raise PlanError(f"layer {str(node.target)!r}: its output quantizer (activation={activation!r}) does not "
                            "follow it in the graph", node.name)
        self.absorb(node, [act] + chain)

    def logits(self, node: fx.Node, rec, x: str) -> None:
        users = list(node.users)
        if isinstance(self.mod(node), QUANT_CONV_TYPES):
            raise PlanError(f"node {node.name!r} ({type(self.mod(node)).__name__}): its output is not followed by an activation "
                            "quantizer (QuantAct); only a Linear that returns logits may produce float output",
                            node.name)
        if not (len(users) == 1 and users[0].op == "output"):
            raise self.unsupported(node, "a Linear without activation quantizer must be the graph output (the float "
                                         "logits)")
        self.add(LogitsStep(name=rec.name, inputs=(x,), output=node.name, layer=rec))
        self.float_slots.add(node.name)

    def pool(self, node: fx.Node, m: nn.Module, keepdim: bool = True) -> None:
        """A pooling module, or a functional pool / spatial mean as its module (``keepdim`` False:
        the global pool's [N, C, 1, 1] codes are then reshaped to [N, C])."""
        x = self.slot(node.args[0], node)
        name = str(node.target) if node.op == "call_module" else node.name
        pooled = node.name if keepdim else f"{node.name}_pool"
        common = dict(name=name, inputs=(x,), output=pooled, x_q=self.q[x])
        if (reason := module_blocker(m)) is not None:
            raise self.unsupported(node, reason)
        if isinstance(m, nn.MaxPool2d):
            out_q, act = self.require_target(node)
            self.add(MaxPoolStep(**common, quant=out_q, activation=act, kernel=int_pair(m.kernel_size),
                                 stride=int_pair(m.stride or m.kernel_size), padding=int_pair(m.padding),
                                 ceil_mode=bool(m.ceil_mode)))
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d)):
            raw = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size,)
            size = (1, int(raw[0])) if isinstance(m, nn.AdaptiveAvgPool1d) else int_pair(raw if len(raw) == 2 else raw[0])
            out_q, act = self.require_target(node)
            if size == (1, 1):
                self.add(GlobalAvgPoolStep(**common, quant=out_q, activation=act))
            else:
                self.add(AdaptiveAvgPoolStep(**common, quant=out_q, activation=act, output_size=size))
        else:
            pad = int_pair(m.padding)
            out_q, act = self.require_target(node)
            self.add(AvgPoolStep(**common, quant=out_q, activation=act, kernel=int_pair(m.kernel_size),
                                 stride=int_pair(m.stride or m.kernel_size), padding=pad))
        if not keepdim:
            self.add(ReshapeStep(name=name, inputs=(pooled,), output=node.name, x_q=out_q, flatten=(1, -1)))

    def add_node(self, node: fx.Node) -> None:
        """An add or a mul of two quantized tensors."""
        if len(node.args) != 2 or node.kwargs:
            raise self.unsupported(node, "add / mul with extra arguments (alpha, out) is not supported")
        a, b = (self.slot(v, node) for v in node.args)
        out_q, act = self.require_target(node)
        step = MulStep if node.target in MUL_FUNCTIONS else AddStep
        self.add(step(name=node.name, inputs=(a, b), output=node.name, x_q=self.q[a], y_q=self.q[b], quant=out_q,
                      activation=act))

    def concat(self, node: fx.Node) -> None:
        xs = [self.slot(v, node) for v in node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
        out_q, act = self.require_target(node)
        if act is not None:
            raise self.unsupported(node, "a ReLU between torch.cat and its activation quantizer is not supported")
        self.add(ConcatStep(name=node.name, inputs=tuple(xs), output=node.name, x_qs=tuple(self.q[x] for x in xs),
                            quant=out_q, dim=int(dim)))

    def reshape(self, node: fx.Node) -> None:
        spec: dict = {}
        if node.op == "call_module":  # nn.Flatten
            m = self.mod(node)
            spec["flatten"] = (m.start_dim, m.end_dim)
        elif node.op == "call_function" or node.target == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            spec["flatten"] = (int(start), int(end))
        src = self.slot(node.args[0], node)
        sized = [src]  # inputs[k] of the step: the tensors whose sizes the shape reads
        if "flatten" not in spec:  # view / reshape: ints and arithmetic of tensor sizes
            dims = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list)) else node.args[1]

            def source_index(t: fx.Node) -> int:
                slot = self.sized_slot(t, node)
                if slot not in sized:
                    sized.append(slot)
                return sized.index(slot)
            try:
                shape = [shape_expr(d, source_index) for d in dims]
            except ValueError as exc:
                raise self.unsupported(node, f".{node.target}(): {exc}") from None
            spec["shape"] = tuple("batch" if d == ("size", 0, 0) else d for d in shape)
        self.add(ReshapeStep(name=str(node.target) if node.op == "call_module" else node.name, inputs=tuple(sized),
                             output=node.name, x_q=self.q[src], **spec))

    def sized_slot(self, t: fx.Node, who: fx.Node) -> str:
        """The slot whose shape a size expression reads (the model input for the normalizer /
        placeholder: same shape)."""
        name = self.alias.get(t.name, t.name)
        if name in self.float_nodes:
            return self.placeholder
        return self.slot(t, who)

    def layout(self, node: fx.Node, op: str, args: tuple) -> None:
        """Permute / transpose / an item of chunk or split / nearest upsample: codes moved, record kept."""
        data = node.args[0].args[0] if op in ("chunk", "split") else node.args[0]
        x = self.slot(data, node)
        name = str(node.target) if node.op == "call_module" else node.name
        self.add(LayoutStep(name=name, inputs=(x,), output=node.name, x_q=self.q[x], op=op, args=args))

    def lookup(self, node: fx.Node) -> None:
        """An elementwise activation as a :class:`LookupStep` (table from its input / output records)."""
        x = self.slot(node.args[0], node)
        out_q, act = self.require_target(node)
        if node.op == "call_module":
            fn = self.mod(node)
        else:
            args, kwargs, target = node.args[1:], dict(node.kwargs), node.target
            fn = (lambda t: getattr(t, target)(*args, **kwargs)) if node.op == "call_method" else \
                (lambda t: target(t, *args, **kwargs))
        name = str(node.target) if node.op == "call_module" else node.name
        self.add(LookupStep(name=name, inputs=(x,), output=node.name, x_q=self.q[x], quant=out_q,
                            table=lookup_table(fn, self.q[x], out_q, act), op=lookup_op(self.gm, node)))

    def standalone_relu(self, node: fx.Node) -> None:
        x = self.slot(node.args[0], node)
        q = self.q[x]
        hi = q.qmax
        if relu_kind(self.gm, node) == "relu6":
            six = q.code_of(RELU6_MAX)
            if six < q.qmax and float(np.float32(q.scale_value) * np.float32(six - q.zero_point_value)) != RELU6_MAX:
                raise self.unsupported(node, "a ReLU6 that is not followed by an activation quantizer is exact only "
                                             "when 6.0 is a code; fuse it (conv -> ReLU6 -> QuantAct)")
            hi = min(six, q.qmax)
        name = str(node.target) if node.op == "call_module" else node.name
        self.add(ClampStep(name=name, inputs=(x,), output=node.name, x_q=q, lo=q.zero_point_value, hi=hi))


def _conv_padding(conv: nn.Module) -> tuple:
    """(top, left, bottom, right) of a Conv2d, or of a Conv1d seen as a Conv2d over [N, C, 1, L]."""
    one_d = len(conv.kernel_size) == 1
    dilation, kernel = ((1,) + tuple(conv.dilation), (1,) + tuple(conv.kernel_size)) if one_d else \
        (conv.dilation, conv.kernel_size)
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        tot = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return (tot[0] // 2, tot[1] // 2, tot[0] - tot[0] // 2, tot[1] - tot[1] // 2)
    ph, pw = (0, int(conv.padding[0])) if one_d else int_pair(conv.padding)
    return (ph, pw, ph, pw)
