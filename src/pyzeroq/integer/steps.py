"""The typed integer plan: one frozen dataclass per integer operation.

:func:`pyzeroq.integer.plan.compile_plan` turns a quantized fx graph into a list of these
steps; :class:`pyzeroq.integer.convert.IntegerModel` runs them on the C++ simulator and
:func:`pyzeroq.export.build_onnx` writes them as ONNX. Both dispatch on the step *type*
through one table each (``{StepType: handler}``), checked complete by :func:`check_handlers`
when their module is imported.

Every step names the value slots it reads (``inputs``, fx node names) and writes
(``output``) and carries the quantization records of its tensors as they are
(:class:`pyzeroq.qspec.TensorQuant` for activations, the layer's
:class:`pyzeroq.qspec.LayerQuant` for conv / linear / logits: weight codes, int32 bias and
fused clamp are read from the record, never recomputed). Activation codes are unsigned
2..8-bit codes in uint8 containers (int8 for signed records), accumulators int32; the only float tensors are the
model input (before :class:`InputStep`) and the logits (after :class:`LogitsStep`).

``kind`` (a class attribute) is a display label only (accumulator report, trace log).

Serialization: :meth:`Step.to_dict` / :func:`step_from_dict` use only dicts, lists, tuples,
primitives and torch tensors (numpy arrays become tensors), so the result loads with
``torch.load(path, weights_only=True)``; arrays are rebuilt with numpy's canonical dtypes
(the C++ kernels check dtype identity), which also makes pickling / deep-copying a step safe.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Optional

import numpy as np

from ..layout_ops import LAYOUT_OPS, apply_layout, eval_shape_expr
from ..outputs import tree_items, tree_map
from ..qspec import ACTIVATIONS, LayerQuant, TensorQuant, activation_clamp  # noqa: F401 (activation_clamp re-exported)

__all__ = ["Step", "InputStep", "ConvStep", "LinearStep", "LogitsStep", "AddStep", "GlobalAvgPoolStep",
           "AvgPoolStep", "MaxPoolStep", "RequantStep", "ClampStep", "ReshapeStep", "LookupStep", "ConcatStep",
           "DequantStep", "LayoutStep", "MulStep", "AdaptiveAvgPoolStep", "STEP_TYPES", "LAYER_STEPS",
           "output_leaves", "map_output", "check_output_spec", "insert_zero_points",
           "activation_clamp", "check_handlers", "step_from_dict", "to_plain", "from_plain"]


CONV_SPATIAL_DIMS = (0, 1, 2)  # 0: a per-channel 1x1 conv over [N, C, ...] of any rank


def _ints(v, n: int, what: str) -> tuple:
    v = tuple(int(e) for e in v)
    if len(v) != n:
        raise ValueError(f"{what} must have {n} values, got {v}")
    return v


@dataclass(frozen=True, kw_only=True)
class Step:
    """Base of the step types. ``name``: the layer's module name or the fx node name;
    ``inputs``: value slots read (tuple of str); ``output``: the value slot written."""

    kind: ClassVar[str] = "step"
    name: str
    inputs: tuple
    output: str

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(str(s) for s in self.inputs))

    @property
    def in_q(self) -> tuple:
        """Records of the input codes (one TensorQuant per entry of ``inputs``)."""
        raise NotImplementedError

    @property
    def out_q(self) -> Optional[TensorQuant]:
        """Record of the output codes; None for float output (logits)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        """Plain data (module docstring); inverse :func:`step_from_dict`."""
        return {"type": type(self).__name__, **{f.name: to_plain(getattr(self, f.name)) for f in fields(self)}}

    def __reduce__(self):
        return step_from_dict, (self.to_dict(),)


@dataclass(frozen=True, kw_only=True)
class InputStep(Step):
    """Float images -> first activation codes: ``(x - mean) / std`` in float32 (the model's
    normalizer; ``mean`` / ``std`` per channel, None without one), then ``out_q.quantize``.
    ``inputs``: the float input slot (the graph's placeholder)."""

    kind: ClassVar[str] = "input"
    quant: TensorQuant
    mean: Optional[tuple] = None
    std: Optional[tuple] = None

    def __post_init__(self):
        super().__post_init__()
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must both be set or both be None")
        if self.mean is not None:
            object.__setattr__(self, "mean", tuple(float(np.float32(v)) for v in self.mean))
            object.__setattr__(self, "std", tuple(float(np.float32(v)) for v in self.std))

    in_q = property(lambda self: ())
    out_q = property(lambda self: self.quant)


@dataclass(frozen=True, kw_only=True)
class _LayerStep(Step):
    """Conv / linear: the layer's record, as :meth:`QuantLayerMixin.layer_record` returns it."""

    layer: LayerQuant

    in_q = property(lambda self: (self.layer.input,))
    out_q = property(lambda self: self.layer.output)

    def clamp_codes(self) -> tuple[int, int]:
        return self.layer.clamp_codes()


@dataclass(frozen=True, kw_only=True)
class ConvStep(_LayerStep):
    """QLinearConv: x uint8 [N, C, H, W] -> uint8 [N, O, OH, OW], weight codes [O, C/groups, KH, KW],
    ``padding`` (top, left, bottom, right), fused clamp of ``layer.activation``.
    ``spatial_dims=1``: a Conv1d, x [N, C, L] and weight codes [O, C/groups, K] run as the Conv2d
    over [N, C, 1, L] that ``stride`` / ``padding`` / ``dilation`` describe; ``spatial_dims=0``: a
    depthwise 1x1 conv (a BatchNorm1d's affine map) over [N, C, ...] of any rank, run on
    [N, C, 1, prod(...)].
    ``upsample`` (uh, uw) > 1: a ConvTranspose2d of that stride, run as this convolution on the
    input with ``u - 1`` zero-point codes inserted between neighbouring pixels."""

    kind: ClassVar[str] = "conv"
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    spatial_dims: int = 2
    upsample: tuple = (1, 1)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "upsample", _ints(self.upsample, 2, "upsample"))
        if self.spatial_dims not in CONV_SPATIAL_DIMS:
            raise ValueError(f"spatial_dims must be one of {CONV_SPATIAL_DIMS}, got {self.spatial_dims!r}")
        object.__setattr__(self, "stride", _ints(self.stride, 2, "stride"))
        object.__setattr__(self, "padding", _ints(self.padding, 4, "padding"))
        object.__setattr__(self, "dilation", _ints(self.dilation, 2, "dilation"))
        object.__setattr__(self, "groups", int(self.groups))


def insert_zero_points(x: np.ndarray, upsample: tuple, zero_point: int) -> np.ndarray:
    """[N, C, H, W] codes -> [N, C, (H-1)*uh+1, (W-1)*uw+1] with ``x`` at every (uh, uw)-th position
    and the zero point (the code of 0.0) between: a transposed convolution's input as a convolution's."""
    uh, uw = upsample
    n, c, h, w = x.shape
    out = np.full((n, c, (h - 1) * uh + 1, (w - 1) * uw + 1), zero_point, dtype=x.dtype)
    out[:, :, ::uh, ::uw] = x
    return out


@dataclass(frozen=True, kw_only=True)
class LinearStep(_LayerStep):
    """Hidden linear layer: uint8 [N, K] -> uint8 [N, O] (weight codes [O, K])."""

    kind: ClassVar[str] = "linear"


@dataclass(frozen=True, kw_only=True)
class LogitsStep(_LayerStep):
    """Final linear layer: int32 accumulator ``bias + sum((a - za) * (w - zw))`` [N, O],
    dequantized to float32 logits ``f32(acc) * dequant`` -- the only float op."""

    kind: ClassVar[str] = "linear_out"

    def __post_init__(self):
        super().__post_init__()
        if self.layer.output is not None:
            raise ValueError(f"layer {self.name!r}: a logits step has a float output (record output None)")

    @property
    def dequant(self) -> np.ndarray:
        """float32 [O]: ``f32(x_scale * w_scale[c])`` (the bias scale)."""
        return self.layer.bias_scale


@dataclass(frozen=True, kw_only=True)
class _RequantStep(Step):
    """One input ``x_q`` requantized to ``quant`` with a fused ``activation`` clamp."""

    x_q: TensorQuant
    quant: TensorQuant
    activation: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    in_q = property(lambda self: (self.x_q,))
    out_q = property(lambda self: self.quant)

    def clamp_codes(self) -> tuple[int, int]:
        return activation_clamp(self.quant, self.activation)


@dataclass(frozen=True, kw_only=True)
class AddStep(_RequantStep):
    """Residual add of two code tensors (records ``x_q``, ``y_q``) requantized to ``quant``."""

    kind: ClassVar[str] = "add"
    y_q: TensorQuant

    in_q = property(lambda self: (self.x_q, self.y_q))


@dataclass(frozen=True, kw_only=True)
class MulStep(AddStep):
    """Elementwise product of two code tensors (records ``x_q``, ``y_q``; shapes broadcast, e.g.
    squeeze-excite gating [N, C, H, W] x [N, C, 1, 1]) requantized to ``quant``
    (:func:`pyzeroq.integer.simulate.qmul`)."""

    kind: ClassVar[str] = "mul"


@dataclass(frozen=True, kw_only=True)
class GlobalAvgPoolStep(_RequantStep):
    """[N, C, H, W] -> [N, C, 1, 1]: exact sum, one requantization ``M = f32(f32(sx/sy) / f32(H*W))``."""

    kind: ClassVar[str] = "global_avg_pool"


@dataclass(frozen=True, kw_only=True)
class _WindowStep(_RequantStep):
    kernel: tuple
    stride: tuple
    padding: tuple  # (pad_h, pad_w)

    def __post_init__(self):
        super().__post_init__()
        for what in ("kernel", "stride", "padding"):
            object.__setattr__(self, what, _ints(getattr(self, what), 2, what))


@dataclass(frozen=True, kw_only=True)
class AvgPoolStep(_WindowStep):
    """AvgPool2d (count_include_pad): exact window sum, ``M = f32(f32(sx/sy) / f32(kh*kw))``."""

    kind: ClassVar[str] = "avg_pool"


@dataclass(frozen=True, kw_only=True)
class AdaptiveAvgPoolStep(_RequantStep):
    """AdaptiveAvgPool2d to ``output_size`` (oh, ow) dividing the input's H, W: the AvgPool2d with
    kernel = stride = (H / oh, W / ow), sized at run time (:class:`AvgPoolStep`'s arithmetic)."""

    kind: ClassVar[str] = "adaptive_avg_pool"
    output_size: tuple

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "output_size", _ints(self.output_size, 2, "output_size"))

    def window(self, height: int, width: int) -> tuple:
        """The kernel (= stride) for an input of ``height`` x ``width``; ValueError unless divisible."""
        (oh, ow) = self.output_size
        if height % oh or width % ow:
            raise ValueError(f"{self.name}: AdaptiveAvgPool2d({self.output_size}) needs an input whose H, W are "
                             f"multiples of the output size, got {height} x {width}")
        return height // oh, width // ow


@dataclass(frozen=True, kw_only=True)
class MaxPoolStep(_WindowStep):
    """Max of codes per window, then a requantization ``M = f32(sx/sy)`` when the records differ.
    ``ceil_mode``: the last window may run past the bottom / right edge (torch's rule)."""

    kind: ClassVar[str] = "max_pool"
    ceil_mode: bool = False

    def ceil_padding(self, height: int, width: int) -> tuple:
        """(top, left, bottom, right) padding of the codes, with ceil_mode's extra bottom / right."""
        pads = []
        for size, k, s, p in zip((height, width), self.kernel, self.stride, self.padding):
            out = (size + 2 * p - k + (s - 1 if self.ceil_mode else 0)) // s + 1
            if self.ceil_mode and (out - 1) * s >= size + p:
                out -= 1  # the last window must start inside the input or the left padding
            pads.append(max((out - 1) * s + k - size - 2 * p, 0))
        return (self.padding[0], self.padding[1], self.padding[0] + pads[0], self.padding[1] + pads[1])


@dataclass(frozen=True, kw_only=True)
class RequantStep(_RequantStep):
    """Standalone requantization ``x_q`` -> ``quant`` (``M = f32(sx/sy)``)."""

    kind: ClassVar[str] = "requant"


@dataclass(frozen=True, kw_only=True)
class ClampStep(Step):
    """Standalone ReLU / ReLU6 on codes: ``clamp(x, lo, hi)``; the record is unchanged."""

    kind: ClassVar[str] = "clamp"
    x_q: TensorQuant
    lo: int
    hi: int

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "lo", int(self.lo))
        object.__setattr__(self, "hi", int(self.hi))

    in_q = property(lambda self: (self.x_q,))
    out_q = property(lambda self: self.x_q)


@dataclass(frozen=True, kw_only=True)
class ReshapeStep(Step):
    """Reshape of the codes: ``flatten=(start_dim, end_dim)`` or ``shape``; exactly one is set.
    ``shape`` entries: ints (-1 included), "batch" (the input's first dimension) or a size
    expression evaluated at run time (:func:`pyzeroq.layout_ops.shape_expr`: ("size", k, dim) is
    dim ``dim`` of ``inputs[k]``; ``inputs[1:]`` are the tensors whose sizes it reads).
    The record is unchanged."""

    kind: ClassVar[str] = "reshape"
    x_q: TensorQuant
    flatten: Optional[tuple] = None
    shape: Optional[tuple] = None

    def __post_init__(self):
        super().__post_init__()
        if (self.flatten is None) == (self.shape is None):
            raise ValueError("exactly one of flatten and shape must be set")
        if self.flatten is not None:
            object.__setattr__(self, "flatten", _ints(self.flatten, 2, "flatten"))
        else:
            object.__setattr__(self, "shape", tuple(d if d == "batch" else _shape_entry(d) for d in self.shape))

    in_q = property(lambda self: (self.x_q,) * len(self.inputs))
    out_q = property(lambda self: self.x_q)

    def apply(self, x: np.ndarray, *sized: np.ndarray) -> np.ndarray:
        if self.flatten is not None:
            start, end = self.flatten[0] % x.ndim, self.flatten[1] % x.ndim
            return x.reshape(x.shape[:start] + (-1,) + x.shape[end + 1:])
        shapes = [x.shape] + [t.shape for t in sized]
        return x.reshape([x.shape[0] if d == "batch" else eval_shape_expr(d, shapes) for d in self.shape])


def _shape_entry(d):
    """An int, or a size expression as nested tuples (lists from a loaded file become tuples)."""
    if isinstance(d, (list, tuple)):
        return tuple(e if isinstance(e, str) else _shape_entry(e) for e in d)
    return int(d)


@dataclass(frozen=True, kw_only=True)
class LayoutStep(Step):
    """Data movement on the codes, record unchanged (:mod:`pyzeroq.layout_ops`): ``op`` "permute"
    (``args``: the dims), "transpose" (two dims), "chunk" / "split" ((dim, n or sizes, item)),
    "upsample" ((fh, fw): nearest, integer factors) or "pad" (torch's pad tuple; the zero point fills)."""

    kind: ClassVar[str] = "layout"
    x_q: TensorQuant
    op: str
    args: tuple

    def __post_init__(self):
        super().__post_init__()
        if self.op not in LAYOUT_OPS:
            raise ValueError(f"op must be one of {LAYOUT_OPS}, got {self.op!r}")
        object.__setattr__(self, "args", _shape_entry(self.args))

    in_q = property(lambda self: (self.x_q,))
    out_q = property(lambda self: self.x_q)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return apply_layout(self.op, self.args, x, self.x_q.zero_point_value)


@dataclass(frozen=True, kw_only=True)
class LookupStep(Step):
    """Elementwise activation ``f`` (``op``: its name, display only) as a table on the input codes:
    ``y = table[x]`` with ``table[q] = out_q.quantize(f(x_q.dequantize(q)))`` computed once in
    float32 by :func:`pyzeroq.integer.lookup.lookup_table` (2**x_q.bits entries of ``quant``'s code
    dtype; a signed code ``q < 0`` reads entry ``2**bits + q``, numpy / ONNX negative indexing)."""

    kind: ClassVar[str] = "lookup"
    x_q: TensorQuant
    quant: TensorQuant
    table: np.ndarray
    op: str = ""

    def __post_init__(self):
        super().__post_init__()
        table = np.ascontiguousarray(self.table, dtype=self.quant.code_dtype).reshape(-1)
        if table.shape[0] != 1 << self.x_q.bits:
            raise ValueError(f"a lookup table of {self.x_q.bits}-bit codes has {1 << self.x_q.bits} entries, "
                             f"got {table.shape[0]}")
        object.__setattr__(self, "table", table)

    in_q = property(lambda self: (self.x_q,))
    out_q = property(lambda self: self.quant)

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(np.array_equal(getattr(self, f.name), getattr(other, f.name)) if f.name == "table"
                   else getattr(self, f.name) == getattr(other, f.name) for f in fields(self))


@dataclass(frozen=True, kw_only=True)
class ConcatStep(Step):
    """``torch.cat`` along ``dim``: each input (record ``x_qs[i]``) requantized to ``quant`` with
    ``M = f32(s_i / s_out)`` (as :class:`RequantStep`; inputs whose record is ``quant`` are copied),
    then concatenated. One output scale, calibrated on the concatenated tensor."""

    kind: ClassVar[str] = "concat"
    x_qs: tuple
    quant: TensorQuant
    dim: int

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "x_qs", tuple(self.x_qs))
        object.__setattr__(self, "dim", int(self.dim))
        if len(self.x_qs) != len(self.inputs) or not self.inputs:
            raise ValueError(f"a concat needs one record per input, got {len(self.x_qs)} for {len(self.inputs)}")

    in_q = property(lambda self: self.x_qs)
    out_q = property(lambda self: self.quant)


@dataclass(frozen=True, kw_only=True)
class DequantStep(Step):
    """Codes at a graph output -> float32 ``f32(scale) * f32(x - zero_point)`` (ONNX
    DequantizeLinear; exact: ``x - zero_point`` is a small integer)."""

    kind: ClassVar[str] = "dequant"
    x_q: TensorQuant

    in_q = property(lambda self: (self.x_q,))
    out_q = property(lambda self: None)

    def apply(self, x: np.ndarray) -> np.ndarray:
        z = np.float32(self.x_q.zero_point_value)
        return np.float32(self.x_q.scale_value) * (x.astype(np.float32) - z)


STEP_TYPES = (InputStep, ConvStep, LinearStep, LogitsStep, AddStep, GlobalAvgPoolStep, AvgPoolStep, MaxPoolStep,
              RequantStep, ClampStep, ReshapeStep, LookupStep, ConcatStep, DequantStep, LayoutStep,
              MulStep, AdaptiveAvgPoolStep)
LAYER_STEPS = (ConvStep, LinearStep, LogitsStep)
_BY_NAME = {t.__name__: t for t in STEP_TYPES}


# ---------------------------------------------------------------------------- output structure
# A plan's output is a slot name (one tensor) or a structure of them as the model returned it:
# tuples, lists and dicts with string keys, nested.

def check_output_spec(spec, where: str = "output") -> None:
    """ValueError unless ``spec`` is a slot name or a (nested) tuple / list / dict of them."""
    if isinstance(spec, str):
        return
    if isinstance(spec, dict):
        if not all(isinstance(k, str) for k in spec):
            raise ValueError(f"{where}: dict outputs need string keys, got {list(spec)!r}")
        items = spec.values()
    elif isinstance(spec, (list, tuple)):
        items = spec
    else:
        raise ValueError(f"{where}: an output must be a tensor, or a tuple / list / dict of them; got "
                         f"{type(spec).__name__}")
    if not items:
        raise ValueError(f"{where}: empty output structure")
    for e in items:
        check_output_spec(e, where)


def output_leaves(spec) -> list:
    """[(path, slot)] of an output structure in order (``path``: the keys / indices to the leaf)."""
    return tree_items(spec, str, "an integer plan's output", "slot name")


def map_output(spec, fn):
    """The output structure with every slot ``s`` replaced by ``fn(s)`` (same container types)."""
    return tree_map(spec, str, fn)


def check_handlers(table: dict, owner: str) -> dict:
    """``table`` ({step type: handler}) if it covers exactly :data:`STEP_TYPES`, else TypeError."""
    missing = [t.__name__ for t in STEP_TYPES if t not in table]
    extra = [getattr(t, "__name__", str(t)) for t in table if t not in STEP_TYPES]
    if missing or extra:
        raise TypeError(f"{owner}: step handlers missing for {missing}, unknown step types {extra}")
    return table


# ---------------------------------------------------------------------------- serialization
_ARRAY, _RECORD = "__array__", "__record__"
_TORCH_DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64", "float32", "float64")


def to_plain(v):
    """Records, numpy arrays and containers -> dicts / lists / tuples / primitives / torch tensors
    (loadable with ``torch.load(..., weights_only=True)``); inverse :func:`from_plain`."""
    import torch

    if isinstance(v, (TensorQuant, LayerQuant)):
        return {_RECORD: type(v).__name__, "fields": to_plain(v.to_dict())}
    if isinstance(v, np.ndarray):
        stored = v if v.dtype.name in _TORCH_DTYPES else v.astype(np.int64)  # e.g. uint16 codes
        return {_ARRAY: torch.from_numpy(np.ascontiguousarray(stored).copy()), "dtype": v.dtype.name}
    if isinstance(v, dict):
        return {k: to_plain(e) for k, e in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(to_plain(e) for e in v)
    if isinstance(v, np.generic):
        return v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot serialize a {type(v).__name__} in an integer plan")


def from_plain(v):
    """Inverse of :func:`_encode`; arrays come back with canonical numpy dtypes."""
    if isinstance(v, dict):
        if _ARRAY in v:
            return v[_ARRAY].numpy().astype(np.dtype(v["dtype"]).type)  # a copy with the canonical dtype
        if _RECORD in v:
            cls = {"TensorQuant": TensorQuant, "LayerQuant": LayerQuant}[v[_RECORD]]
            return cls.from_dict(from_plain(v["fields"]))
        return {k: from_plain(e) for k, e in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(from_plain(e) for e in v)
    return v


def step_from_dict(d: dict) -> Step:
    """The step :meth:`Step.to_dict` wrote (ValueError for an unknown type)."""
    if not isinstance(d, dict) or d.get("type") not in _BY_NAME:
        raise ValueError(f"not an integer step: {d.get('type') if isinstance(d, dict) else type(d).__name__!r}")
    return _BY_NAME[d["type"]](**{k: from_plain(v) for k, v in d.items() if k != "type"})
