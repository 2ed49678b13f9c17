"""ONNX export of a quantized model in QDQ form: float ops between QuantizeLinear / DequantizeLinear.

The graph is built from the same typed integer plan as the QOperator graph of
:mod:`pyzeroq.export` (:func:`pyzeroq.integer.convert.to_integer`, one handler per step type in
:data:`QDQ_HANDLERS`, checked complete at import), with the placement of onnxruntime's
``quantize_static(quant_format=QuantFormat.QDQ)``: every activation is a code tensor written by a
QuantizeLinear and read through one DequantizeLinear per tensor; weights are initializers of
their codes followed by a DequantizeLinear (per output channel: ``axis=0``), the bias an int32
initializer with DequantizeLinear(scale ``f32(x_scale * w_scale[c])``, zero point 0, ``axis=0``).
Scales, zero points, codes and the bias are the records' (:mod:`pyzeroq.qspec`), never re-derived.

=====================  ==========================================================================
integer step           ONNX (``DQ`` / ``Q``: DequantizeLinear / QuantizeLinear)
=====================  ==========================================================================
InputStep              ``Sub(mean)``, ``Div(std)``, ``Q`` (``pixels="uint8"``: the QOperator pixel table)
ConvStep               ``DQ(x)``, ``DQ(w)``, ``DQ(bias)`` -> ``Conv`` -> [``Relu`` | ``Clip``] -> ``Q``; a
                       Conv1d as a 1-D ``Conv``; a channel affine on codes reshaped to [N, C, 1, prod(...)];
                       a ConvTranspose2d as the ``Conv`` after the zero points are inserted into the codes
LinearStep / Logits    ``Gemm(transB=1)`` on [rows, K] (an [N, ..., K] input reshaped), ``Q`` / float logits
AddStep, MulStep       ``DQ`` x2 -> ``Add`` / ``Mul`` -> [``Relu`` | ``Clip``] -> ``Q``
pools                  ``DQ`` -> ``GlobalAveragePool`` / ``AveragePool`` (count_include_pad) / ``MaxPool`` -> ``Q``
RequantStep            ``DQ`` -> ``Q`` (the new record)
ConcatStep             ``DQ`` per input -> ``Concat`` -> ``Q``
ClampStep              ``DQ`` -> ``Relu`` / ``Clip`` -> ``Q``
Reshape, LayoutStep    ``DQ`` -> ``Reshape`` / ``Transpose`` / ``Slice`` / ``Resize`` / ``Pad`` (0.0) -> ``Q``
LookupStep             ``Cast`` -> ``Gather`` on the codes from the step's table (the activation's
                       arguments are not in the plan, and the table is the simulator's)
DequantStep            ``DQ`` (a returned tensor)
=====================  ==========================================================================

Clamps: a fused ReLU / ReLU6 or codes of fewer bits than their 8 / 16-bit container run as
``Relu`` / ``Clip`` at the real values of the clamp codes before the QuantizeLinear, only where the
QuantizeLinear's saturation does not already give them (exact: quantization is monotone).

Code types follow each record's ``signed`` / ``bits`` (:func:`pyzeroq.onnx_graph.code_type`):
activations uint8 / int8 (uint16 / int16 above 8 bits); weights of at most 4 bits packed two per
byte as UINT4 / INT4 (opset 21), 5..8 bits uint8 / int8. 2-bit weights are UINT4 / INT4 by default;
``int2_weights=True`` stores them four per byte as UINT2 / INT2 (opset 25), which onnxruntime 1.32
runs only at ORT_ENABLE_BASIC or below: at EXTENDED / ALL (its default) its QDQ fusion builds a
QLinearConv / QGemm with 2-bit weights and the session fails its type check. So the weights and
biases of the file take ``report.size_bytes`` bytes exactly with ``int2_weights`` (plus the padding
of the last byte per layer), and 2 bits more per 2-bit weight without.

What onnxruntime 1.32 (CPU) computes, against the simulator (float32_rne; tests/test_export_qdq.py
runs every op alone on the simulator's input codes and whole graphs on nine zoo models):

* bit-exact at every optimization level: the input quantization, lookup tables, data movement
  (``Q(DQ(q)) == q``), ReLU / ReLU6, max pooling and concatenation within one record;
* graph optimizations off (plain float DQ / Q semantics): adds and products are bit-exact (the
  simulator's float32 formula, QuantizeLinear dividing by the scale); Conv / Gemm accumulate
  dequantized products in float32, average pools sum dequantized values, and requantizations to
  another record compute ``rne(f32(sx*(x-zx))/sy)`` instead of ``rne(f32(sx/sy)*(x-zx))``: one code
  off at near-ties (about 1e-5 of a conv's codes); logits within ~5e-7 (relative);
* QDQ fusion on (ORT_ENABLE_EXTENDED / ALL): Conv / Gemm with 8-bit weights become QLinearConv /
  QGemm, bit-exact (integer accumulator, multiplier ``f32(f32(sx*sw)/sy)``, half-to-even; QGemm's
  float logits ``f32(acc) * f32(sx*sw)``); 4-bit (and 2-bit) weights are not fused (QLinearConv
  takes 8-bit weights) and stay float as above; with int8 activations (``target="tflite"`` /
  ``"onnxruntime"`` / ``"tensorrt"``: S8S8) onnxruntime's x86 builds fuse Conv only with the session
  option ``session.qdqisint8allowed=1`` (on by default for ARM; bit-exact then, float Conv without
  it), Gemm either way; adds / products become the fixed-point QLinearAdd /
  QLinearMul (one code off at near-ties); QLinearGlobalAveragePool is bit-exact over power-of-two
  windows (its multiplier ``sx / (sy*HW)`` is the simulator's ``f32(sx/sy) / HW`` then); a Clip
  before the QuantizeLinear (codes of fewer bits than their container) keeps the pool float;
  QLinearAveragePool rounds ``y/sy + zp``, so every exact tie of the simulator's ``rne(y/sy) + zp``
  (a quarter of a 2x2 pool's outputs when the pool keeps its input's record) is one code off when
  the zero point is odd.

End to end these one-code differences propagate (16 images): W8A8 with fusion on was identical to
the simulator on seven of the nine test models (Inception: 28 of 385,024 codes, from its adaptive
average pool; DenseNet: 0.6 %, max 4 steps, from its 2x2 average pool); with fusion off, or at W4A8,
at most 0.1 % of the codes differ by at most 2 steps (DenseNet 0.6 %, 4 steps).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ._optional import require
from .integer.convert import IntegerModel
from .integer.steps import (
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
    check_handlers,
)
from .onnx_graph import (
    PACKED_WIDTHS,
    PIXELS,
    GraphBuilder,
    assemble,
    check_choice,
    check_integer_model,
    container_bits,
    container_range,
    example_shapes,
    max_pool_attrs,
)
from .qspec import TensorQuant

__all__ = ["build_qdq", "QDQ_HANDLERS", "qdq_opset", "weight_width", "real_of", "QDQ_OPSET", "QDQ_OPSET_2BIT"]

QDQ_OPSET = 21  # DequantizeLinear on INT4 / UINT4 (and per-axis scales on them)
QDQ_OPSET_2BIT = 25  # DequantizeLinear on INT2 / UINT2
GRAPH_NAME = "pyzeroq_qdq"
WEIGHT_AXIS = 0  # per-output-channel weight records: [O, ...] (Conv, and Gemm with transB=1)
INT2_WIDTH, INT4_WIDTH = PACKED_WIDTHS


def weight_width(int2_weights: bool) -> int:
    """The smallest container of weight codes: 2 bits (INT2 / UINT2) or 4 (INT4 / UINT4)."""
    return INT2_WIDTH if int2_weights else INT4_WIDTH


def qdq_opset(int_model: IntegerModel, int2_weights: bool = False) -> int:
    """The opset of the QDQ graph: :data:`QDQ_OPSET_2BIT` when ``int2_weights`` and a layer has
    <= 2-bit weights (stored as INT2 / UINT2), else :data:`QDQ_OPSET`."""
    layers = [s.layer for s in int_model.steps if getattr(s, "layer", None) is not None]
    two_bit = any(container_bits(layer.weight, weight_width(int2_weights)) == INT2_WIDTH for layer in layers)
    return QDQ_OPSET_2BIT if two_bit else QDQ_OPSET


def real_of(q: TensorQuant, code: int) -> np.float32:
    """float32 ``scale * (code - zero_point)`` of a per-tensor record (DequantizeLinear's value)."""
    return np.float32(np.float32(q.scale_value) * np.float32(code - q.zero_point_value))


class _QdqBuilder(GraphBuilder):
    """QDQ handlers, one method per step type (:data:`QDQ_HANDLERS`). Every value slot of the plan
    holds codes (the output of a QuantizeLinear, a Gather or the input's); a step reads its inputs
    through one DequantizeLinear per slot (shared by the consumers) and writes its output through
    a QuantizeLinear."""

    def __init__(self, int_model: IntegerModel, shapes: dict, pixels: str, int2_weights: bool = False):
        super().__init__(int_model, shapes, pixels)
        self.weight_width = weight_width(int2_weights)
        self.reals: dict = {}  # code slot -> its DequantizeLinear output

    # ------------------------------------------------------------------ Q / DQ
    def dq(self, slot: str, q: TensorQuant) -> str:
        """The float value of code slot ``slot`` (record ``q``): one DequantizeLinear per slot."""
        if slot not in self.reals:
            s, z = self.qparams(f"{slot}_dq", q)
            self.node("DequantizeLinear", [slot, s, z], [f"{slot}_real"], f"{slot}_dequantize")
            self.reals[slot] = f"{slot}_real"
        return self.reals[slot]

    def requantize(self, real: str, q: TensorQuant, out: str, lo: Optional[int] = None, hi: Optional[int] = None):
        """``real`` -> [``Relu`` | ``Clip``] -> ``QuantizeLinear`` (record ``q``) -> codes ``out``.
        ``lo`` / ``hi`` (codes; default ``q``'s range): a clamp beyond the saturation of the 8 / 16-bit
        container -- a fused ReLU whose zero point is above the container's lowest code, ReLU6,
        codes of fewer bits -- runs in float before the QuantizeLinear at the real values of those
        codes (exact: quantization is monotone and maps ``scale * (c - zero_point)`` back to ``c``)."""
        lo, hi = q.qmin if lo is None else lo, q.qmax if hi is None else hi
        tmin, tmax = container_range(q)
        if lo > tmin and lo == q.zero_point_value and hi >= tmax:
            self.node("Relu", [real], [f"{out}_relu"], f"{out}_relu")
            real = f"{out}_relu"
        elif lo > tmin or hi < tmax:
            bounds = [self.const(f"{out}_min", real_of(q, lo)) if lo > tmin else "",
                      self.const(f"{out}_max", real_of(q, hi)) if hi < tmax else ""]
            self.node("Clip", [real, *bounds], [f"{out}_clip"], f"{out}_clip")
            real = f"{out}_clip"
        s, z = self.qparams(f"{out}_q", q)
        self.node("QuantizeLinear", [real, s, z], [out], f"{out}_quantize")

    def weight(self, step: Step, codes: np.ndarray) -> str:
        """DequantizeLinear of a layer's weight codes (the record's, reshaped only), stored in the
        smallest ONNX type (:func:`pyzeroq.onnx_graph.code_type`, packed); per output channel: axis 0."""
        wq, b = step.layer.weight, step.output
        w = self.code_const(f"{b}_weight", codes, wq, self.weight_width)
        scale = self.const(f"{b}_weight_scale", wq.scale)
        zp = self.code_const(f"{b}_weight_zero_point", wq.zero_point, wq, self.weight_width)
        attrs = {"axis": WEIGHT_AXIS} if wq.per_channel else {}
        self.node("DequantizeLinear", [w, scale, zp], [f"{b}_weight_real"], f"{b}_weight_dequantize", **attrs)
        return f"{b}_weight_real"

    def layer_inputs(self, step: Step, x_real: str, codes: np.ndarray) -> list:
        """[x, DequantizeLinear(weight)] + [DequantizeLinear(int32 bias)]: the bias as the record holds
        it, scale ``layer.bias_scale`` (``f32(x_scale * w_scale[c])``) per channel, zero point 0."""
        layer, b = step.layer, step.output
        ins = [x_real, self.weight(step, codes)]
        if layer.bias is not None:
            bias = self.const(f"{b}_bias", layer.bias)
            scale = self.const(f"{b}_bias_scale", layer.bias_scale)
            zp = self.const(f"{b}_bias_zero_point", np.zeros(layer.out_channels, np.int32))
            self.node("DequantizeLinear", [bias, scale, zp], [f"{b}_bias_real"], f"{b}_bias_dequantize",
                      axis=WEIGHT_AXIS)
            ins.append(f"{b}_bias_real")
        return ins

    def rows(self, step: Step, src: str) -> str:
        """An [N, ..., K] input as [N * ..., K] rows (the rows are independent); 2-D as it is."""
        k = self.shapes[src][-1]
        if len(self.shapes[src]) == 2:
            return src
        self.node("Reshape", [src, self.const(f"{step.output}_rows", np.array([-1, k], np.int64))],
                  [f"{step.output}_x2"], f"{step.output}_to_rows")
        return f"{step.output}_x2"

    def unrows(self, step: Step, src: str) -> None:
        """Rows [N * ..., O] -> the output slot [N, ..., O]."""
        shape = np.array([-1, *self.shapes[step.output][1:]], np.int64)
        self.node("Reshape", [src, self.const(f"{step.output}_shape", shape)], [step.output], f"{step.output}_from_rows")

    # ------------------------------------------------------------------ steps
    def input(self, step: InputStep):
        if self.pixels == "uint8":
            self.pixel_input(step, step.output)
        else:
            self.requantize(self.normalized_input(step), step.quant, step.output)

    def conv(self, step: ConvStep):
        """Conv on DequantizeLinear'd input / weight / bias -> QuantizeLinear. Conv1d: a 1-D Conv; a
        channel affine (``spatial_dims=0``): codes reshaped to [N, C, 1, prod(...)] and back; a
        transposed conv: its zero points inserted into the codes, then the Conv."""
        layer, b, src = step.layer, step.output, step.inputs[0]
        codes, out, in_shape = layer.weight_codes, step.output, self.shapes[src]
        attrs = dict(strides=list(step.stride), pads=list(step.padding), dilations=list(step.dilation))
        if step.spatial_dims == 0:
            flat = int(np.prod(in_shape[2:], dtype=np.int64))
            self.node("Reshape", [src, self.const(f"{b}_flat", np.array([-1, in_shape[1], 1, flat], np.int64))],
                      [f"{b}_x4"], f"{b}_to_4d")
            src, codes, out = f"{b}_x4", codes[:, :, None, :], f"{b}_y4"
        elif step.spatial_dims == 1:  # stored as the Conv2d over [N, C, 1, L]: its W entries
            attrs = dict(strides=[step.stride[1]], pads=[step.padding[1], step.padding[3]],
                         dilations=[step.dilation[1]])
        if step.upsample != (1, 1):
            src = self.insert_zero_points(step, src)
        self.node("Conv", self.layer_inputs(step, self.dq(src, layer.input), codes), [f"{b}_conv"], f"{b}_conv",
                  group=step.groups, kernel_shape=list(codes.shape[2:]), **attrs)
        self.requantize(f"{b}_conv", layer.output, out, *step.clamp_codes())
        if step.spatial_dims == 0:
            self.node("Reshape", [out, self.const(f"{b}_back", np.array([-1, *in_shape[1:]], np.int64))], [b],
                      f"{b}_from_4d")

    def gemm(self, step: Step) -> tuple[str, bool]:
        """Gemm (transB=1) of a linear layer on [N, K] rows; returns (its float output, reshaped)."""
        layer, b = step.layer, step.output
        rows = self.rows(step, step.inputs[0])
        self.node("Gemm", self.layer_inputs(step, self.dq(rows, layer.input), layer.weight_codes), [f"{b}_gemm"],
                  f"{b}_gemm", transB=1)
        return f"{b}_gemm", rows != step.inputs[0]

    def linear(self, step: LinearStep):
        gemm, reshaped = self.gemm(step)
        out = f"{step.output}_y2" if reshaped else step.output
        self.requantize(gemm, step.layer.output, out, *step.clamp_codes())
        if reshaped:
            self.unrows(step, out)

    def logits(self, step: LogitsStep):
        """Gemm with a float output (no QuantizeLinear)."""
        gemm, reshaped = self.gemm(step)
        if reshaped:
            self.unrows(step, gemm)
        else:
            self.node("Identity", [gemm], [step.output], f"{step.output}_logits")

    def add(self, step: AddStep):
        self.binary(step, "Add")

    def mul(self, step: MulStep):
        self.binary(step, "Mul")

    def binary(self, step: AddStep, op: str):
        a, c = self.dq(step.inputs[0], step.x_q), self.dq(step.inputs[1], step.y_q)
        self.node(op, [a, c], [f"{step.output}_{op.lower()}"], f"{step.output}_{op.lower()}")
        self.requantize(f"{step.output}_{op.lower()}", step.quant, step.output, *step.clamp_codes())

    def pool(self, step: Step, op: str, **attrs):
        """``op`` (a pooling) on the DequantizeLinear'd input -> QuantizeLinear."""
        self.node(op, [self.dq(step.inputs[0], step.x_q)], [f"{step.output}_pool"], f"{step.output}_pool", **attrs)
        self.requantize(f"{step.output}_pool", step.quant, step.output, *step.clamp_codes())

    def global_avg_pool(self, step: GlobalAvgPoolStep):
        self.pool(step, "GlobalAveragePool")

    def avg_pool(self, step: AvgPoolStep):
        (ph, pw) = step.padding
        self.pool(step, "AveragePool", kernel_shape=list(step.kernel), strides=list(step.stride),
                  pads=[ph, pw, ph, pw], count_include_pad=1)

    def adaptive_avg_pool(self, step: AdaptiveAvgPoolStep):
        window = list(step.window(*self.shapes[step.inputs[0]][2:]))
        self.pool(step, "AveragePool", kernel_shape=window, strides=window)

    def max_pool(self, step: MaxPoolStep):
        attrs = max_pool_attrs(step, *self.shapes[step.inputs[0]][2:])
        q = step.quant
        if step.x_q == q and step.clamp_codes() == (q.qmin, q.qmax):  # the max of codes: data movement
            self.node("MaxPool", [self.dq(step.inputs[0], q)], [f"{step.output}_pool"], f"{step.output}_pool", **attrs)
            self.moved(f"{step.output}_pool", q, step.output)
        else:
            self.pool(step, "MaxPool", **attrs)

    def requant(self, step: RequantStep):
        self.requantize(self.dq(step.inputs[0], step.x_q), step.quant, step.output, *step.clamp_codes())

    def concat(self, step: ConcatStep):
        reals = [self.dq(src, xq) for src, xq in zip(step.inputs, step.x_qs)]
        self.node("Concat", reals, [f"{step.output}_concat"], f"{step.output}_concat", axis=step.dim)
        self.requantize(f"{step.output}_concat", step.quant, step.output)

    def clamp(self, step: ClampStep):
        self.requantize(self.dq(step.inputs[0], step.x_q), step.x_q, step.output, step.lo, step.hi)

    def moved(self, real: str, q: TensorQuant, out: str):
        """QuantizeLinear of data moved in float, back to its own record ``q``: no clamp, since
        the values are ``q``'s codes (or the zero point) already. (A ``Clip`` there, for codes of
        fewer bits than their container, also made onnxruntime 1.32's QDQ propagation at
        ORT_ENABLE_ALL build a QuantizeLinear of mismatched types for int8 codes: the session failed.)"""
        tmin, tmax = container_range(q)
        self.requantize(real, q, out, tmin, tmax)

    def reshape(self, step: ReshapeStep):
        self.reshape_node(step, self.dq(step.inputs[0], step.x_q), f"{step.output}_reshaped")
        self.moved(f"{step.output}_reshaped", step.x_q, step.output)

    def layout(self, step: LayoutStep):
        """Data movement in float (``Pad`` fills with 0.0, whose code is the zero point) -> QuantizeLinear."""
        self.layout_node(step, self.dq(step.inputs[0], step.x_q), f"{step.output}_moved",
                         lambda: self.const(f"{step.output}_fill", np.float32(0.0)))
        self.moved(f"{step.output}_moved", step.x_q, step.output)

    def dequant(self, step: DequantStep):
        self.node("Identity", [self.dq(step.inputs[0], step.x_q)], [step.output], f"{step.output}_float")


QDQ_HANDLERS = check_handlers({
    InputStep: _QdqBuilder.input, ConvStep: _QdqBuilder.conv, LinearStep: _QdqBuilder.linear,
    LogitsStep: _QdqBuilder.logits, AddStep: _QdqBuilder.add, GlobalAvgPoolStep: _QdqBuilder.global_avg_pool,
    AvgPoolStep: _QdqBuilder.avg_pool, MaxPoolStep: _QdqBuilder.max_pool, RequantStep: _QdqBuilder.requant,
    ClampStep: _QdqBuilder.clamp, ReshapeStep: _QdqBuilder.reshape, LookupStep: _QdqBuilder.lookup,
    ConcatStep: _QdqBuilder.concat, DequantStep: _QdqBuilder.dequant, LayoutStep: _QdqBuilder.layout,
    MulStep: _QdqBuilder.mul, AdaptiveAvgPoolStep: _QdqBuilder.adaptive_avg_pool,
}, "the QDQ ONNX builder")


def build_qdq(int_model: IntegerModel, example_input, pixels: str = "float", intermediate: bool = False,
              int2_weights: bool = False):
    """QDQ ONNX ModelProto of an integer model (module docstring); ``example_input`` ([N, C, H, W]
    float images in [0, 1] or uint8 pixels) fixes the per-sample shape, the batch stays dynamic.
    ``pixels``: "float" (float32 input, normalization and QuantizeLinear) or "uint8" (the
    integer-only pixel table). ``intermediate``: also output every activation's codes (named by its
    fx node; uint8 / int8 / uint16 / int16 as the record's ``signed`` / ``bits`` say) for checks.
    ``int2_weights``: store <= 2-bit weights as INT2 / UINT2 (four per byte, opset 25) instead of
    INT4 / UINT4 (two per byte, opset 21): onnxruntime 1.32 runs such a graph only at graph
    optimization level ORT_ENABLE_BASIC or below (at EXTENDED / ALL its QDQ fusion builds a
    QLinearConv / QGemm with 2-bit weights, which fails the session's type check).

    TypeError unless ``int_model`` is an IntegerModel (``pyzeroq.to_integer``); ValueError for a
    rounding other than "float32_rne", a bad ``pixels`` or ``example_input``
    (:meth:`IntegerModel.check_input`), all before anything is built.
    """
    require("onnx", "onnx", "ONNX export")
    from onnx.helper import find_min_ir_version_for, make_opsetid

    check_integer_model(int_model)
    check_choice(pixels, PIXELS, "pixels")
    if not isinstance(int2_weights, bool):
        raise TypeError(f"int2_weights must be a bool, got {type(int2_weights).__name__}")
    example, shapes = example_shapes(int_model, example_input, pixels)
    b = _QdqBuilder(int_model, shapes, pixels, int2_weights)
    for step in int_model.steps:
        QDQ_HANDLERS[type(step)](b, step)
    opset = qdq_opset(int_model, int2_weights)
    return assemble(b, example, GRAPH_NAME, {"": opset}, find_min_ir_version_for([make_opsetid("", opset)]),
                    intermediate)
