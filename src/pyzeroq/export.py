"""ONNX export of a quantized model in QOperator form (runs on onnxruntime).

The graph is built from the typed integer plan of :func:`pyzeroq.integer.convert.to_integer`
(``rounding="float32_rne"``; step types in :mod:`pyzeroq.integer.steps`), one ONNX op group per
step, dispatched on the step type through one table (:data:`ONNX_HANDLERS`, checked complete at
import), so that onnxruntime computes the same codes as the simulator:

=====================  ==========================================================================
integer step           ONNX
=====================  ==========================================================================
InputStep              float input: ``Sub(mean)``, ``Div(std)`` (the model's normalization, same float32
                       ops), ``QuantizeLinear``; ``pixels="uint8"``: ``Cast(int32)`` [+ channel offset]
                       ``Gather`` from the 256-entry table (integer only)
ConvStep               ``QLinearConv`` (uint8 / int8 per-channel weights and zero points, int32 bias); a Conv1d
                       between ``Unsqueeze`` / ``Squeeze`` (the Conv2d over [N, C, 1, L]); a ConvTranspose2d
                       after ``Reshape``, ``Pad`` (zero point), ``Reshape``, ``Slice`` (zero points inserted)
LinearStep (hidden)    ``Unsqueeze`` -> 1x1 ``QLinearConv`` -> ``Flatten`` (QLinearMatMul has no bias); an
                       [N, ..., K] input between ``Reshape`` to rows and back
LogitsStep             ``MatMulInteger`` (per-column weight zero points) -> ``Add`` int32 bias ->
                       ``Cast(float)`` -> ``Mul`` by ``f32(x_scale * w_scale[c])``
AddStep                ``DequantizeLinear`` x2 -> ``Add`` -> ``Div(y_scale)`` -> ``QuantizeLinear(scale 1)``
                       (the simulator's float32_rne add, op for op; ``add_op="qlinearadd"``: the
                       com.microsoft ``QLinearAdd`` kernel instead, see below)
GlobalAvgPoolStep,     depthwise ``QLinearConv`` with all-ones weights (scale 1, zero point 0),
AvgPoolStep            ``x_scale = f32(sx / sy)``, ``y_scale = kh * kw``: its multiplier
                       ``f32(f32(x_scale * 1) / y_scale)`` is exactly the simulator's pooling
                       multiplier ``f32(f32(sx / sy) / f32(kh * kw))``
MaxPoolStep            ``MaxPool`` on codes (``ceil_mode`` as torch) [+ 1x1 ones ``QLinearConv`` requantization]
AdaptiveAvgPoolStep    the AvgPoolStep emission with kernel = stride = input size / output size
RequantStep            1x1 depthwise ones ``QLinearConv`` (``M = f32(sx / sy)``)
fused ReLU / ReLU6,    ``Clip`` on codes (only where it changes something: the zero point of a
ClampStep, bits < 8    ReLU output is usually a code above the lowest, the code of 6.0 beyond the top)
ReshapeStep            ``Reshape`` (batch dimension kept dynamic)
ConcatStep             per input whose record differs from the output's: the RequantStep emission (1x1
                       depthwise ones ``QLinearConv``; 2-D inputs through ``Unsqueeze`` / ``Flatten``), then
                       ``Concat`` [+ ``Clip``, bits < 8]
LookupStep             ``Cast(int32)`` -> ``Gather`` from the step's table (int8 codes: negative indices) (Hardswish, SiLU, GELU,
                       Sigmoid, Tanh, ...: the table is the simulator's, so bit-exact by construction)
MulStep                ``DequantizeLinear`` x2 -> ``Mul`` -> ``Div(y_scale)`` -> ``QuantizeLinear(scale 1)``
                       (as the add; shapes broadcast)
DequantStep            ``DequantizeLinear`` (a returned tensor other than the logits)
LayoutStep             ``Transpose`` (permute / transpose), ``Slice`` (an item of chunk / split), ``Resize``
                       (nearest upsample, asymmetric coordinates, floor: plain replication), ``Pad`` (zero
                       padding: the zero point)
graph outputs          one ``Identity`` per returned tensor: "logits" for a single output; for a tuple /
                       list / dict, the keys / indices joined by "." ("boxes", "output.0", ...); an internal
                       value of that name is renamed ("<name>_value"); only "input" (the graph input)
                       becomes "input_output"
=====================  ==========================================================================

Codes take their record's type: uint8, or int8 for signed records (``QuantConfig(target=...)``:
S8S8 / U8S8 ``QLinearConv`` and ``MatMulInteger``, int8 ``QuantizeLinear`` / ``MaxPool`` / ``Clip``;
int8 activations with asymmetric uint8 weights get S8S8 weights ``w - 128``, zero points ``zw - 128``:
the same differences, as onnxruntime has no S8U8 ``QLinearConv``).
Weights of every bit width are stored as 8-bit codes (QLinearConv and MatMulInteger take 8-bit
weights): a 2- or 4-bit model's file is as large as at 8 bits. ``format="qdq"``
(:mod:`pyzeroq.export_qdq`) packs them into INT4 / UINT4 (or INT2 / UINT2) initializers instead.

Agreement with the simulator (float32_rne): every op above is bit-exact -- QuantizeLinear,
QLinearConv, MatMulInteger, Cast, Mul, MaxPool and Clip by construction (QLinearConv is tested
against the simulator on constructed ties in tests/test_integer_onnxruntime.py), the add because
it is the same float32 formula. tests/test_export.py checks the codes of every intermediate
activation and the logits for equality, with onnxruntime's graph optimizations on and off.

Why the add is not ``QLinearAdd``: onnxruntime's x86 QLinearAdd kernel works in fixed point
(22-bit multipliers, MlasCalcQLinearAddParameters), so a sum within ~2^-22 (relative) of a
rounding tie can land one code away from ``rne((sa*(a-za) + sb*(b-zb)) / sy)`` (seen on ResNet-20:
exact 108.5000019 -> QLinearAdd 108, simulator / fake-quant model 109). A plain
DequantizeLinear -> Add -> QuantizeLinear is exact only with graph optimizations off: the
QDQ fusion turns it into QLinearAdd; dividing by ``y_scale`` first and quantizing with scale
1.0 (the same two float32 operations) is not fused. With ``add_op="qlinearadd"`` the graph
is pure QOperator; each add then differs from the simulator by at most one code at such
near-ties (tested), and those differences propagate to later layers.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ._checks import output_path
from ._optional import require
from .export_qdq import build_qdq
from .integer.convert import IntegerModel, to_integer
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
    PIXELS,
    GraphBuilder,
    assemble,
    check_choice,
    check_integer_model,
    code_dtype,
    example_shapes,
    max_pool_attrs,
    output_names,
    reshape_target,
)

__all__ = ["export_onnx", "build_onnx", "ONNX_HANDLERS", "FORMATS", "output_names", "reshape_target"]

ONNX_OPSET = 17
MS_DOMAIN = "com.microsoft"
MS_OPSET = 1
IR_VERSION = 8
ADD_OPS = ("exact", "qlinearadd")
FORMATS = ("qoperator", "qdq")
INT8_OFFSET = 128  # uint8 code - 128 = the int8 code of the same difference from the zero point


class _Builder(GraphBuilder):
    """QOperator handlers, one method per step type (:data:`ONNX_HANDLERS`); the bookkeeping and
    the emissions both exporters share are :class:`pyzeroq.onnx_graph.GraphBuilder`'s."""

    def __init__(self, int_model: IntegerModel, shapes: dict, add_op: str, pixels: str):
        super().__init__(int_model, shapes, pixels)
        self.add_op = add_op

    def clip(self, src: str, out: str, lo: int, hi: int, name: str, q) -> str:
        """Clip of codes of record ``q`` (a uint8 / int8 tensor) to [lo, hi], or an Identity when it
        changes nothing."""
        info = np.iinfo(code_dtype(q))
        if lo <= info.min and hi >= info.max:
            self.node("Identity", [src], [out], name)
        else:
            self.node("Clip", [src, self.code_const(f"{name}_lo", max(lo, info.min), q),
                               self.code_const(f"{name}_hi", min(hi, info.max), q)], [out], name)
        return out

    def finish(self, step: Step, raw: str, lo: Optional[int] = None, hi: Optional[int] = None):
        """Clamp of a fused ReLU / ReLU6 (``lo``, ``hi`` codes) and of bits < 8 into the step's output slot."""
        q = step.out_q
        bottom = q.qmin if lo is None else max(lo, q.qmin)
        top = q.qmax if hi is None else min(hi, q.qmax)
        self.clip(raw, step.output, bottom, top, f"{step.output}_clip", q)

    def ones_conv(self, step: Step, src: str, out: str, x_scale: float, y_scale: float, kernel, stride, pads,
                  index: int = 0, base: Optional[str] = None):
        """Depthwise all-ones QLinearConv on input ``index`` of ``step``: exact window sums, one requantization."""
        xq, yq = step.in_q[index], step.out_q
        channels = self.shapes[step.inputs[index]][1]
        b = base or f"{step.output}_pool"
        ins = [src, self.const(f"{b}_x_scale", np.float32(x_scale)),
               self.code_const(f"{b}_x_zero_point", xq.zero_point_value, xq),
               # weights of x's type: onnxruntime has U8U8 / S8S8 (no S8U8) QLinearConv kernels
               self.code_const(f"{b}_w", np.ones((channels, 1) + tuple(kernel), np.int64), xq),
               self.const(f"{b}_w_scale", np.float32(1.0)), self.code_const(f"{b}_w_zero_point", 0, xq),
               self.const(f"{b}_y_scale", np.float32(y_scale)),
               self.code_const(f"{b}_y_zero_point", yq.zero_point_value, yq)]
        self.node("QLinearConv", ins, [out], b, group=int(channels), kernel_shape=list(kernel), strides=list(stride),
                  pads=list(pads))

    # ------------------------------------------------------------------ steps
    def input(self, step: InputStep):
        raw = f"{step.output}_raw"
        if self.pixels == "uint8":
            self.pixel_input(step, raw)
            self.node("Identity", [raw], [step.output], f"{step.output}_codes")
            return
        src = self.normalized_input(step)
        s, z = self.qparams(step.output, step.quant)
        self.node("QuantizeLinear", [src, s, z], [raw], f"{step.output}_quantize")
        self.finish(step, raw)

    def conv_like(self, step: Step, src: str, out: str, w: np.ndarray, **attrs):
        """QLinearConv of a layer record (uint8 / int8 weights [O, C, KH, KW], per-channel scales / zero
        points)."""
        layer, b = step.layer, step.output
        w_scale, w_zp = layer.weight.channels(layer.out_channels)
        sx, zx = self.qparams(f"{b}_x", layer.input)
        sy, zy = self.qparams(f"{b}_y", layer.output)
        if layer.input.signed and not layer.weight.signed:
            # onnxruntime has no S8U8 QLinearConv: the same differences w - zw as int8 codes (w - 128, zw - 128)
            w = (w.astype(np.int16) - INT8_OFFSET).astype(np.int8)
            w_zp_name = self.const(f"{b}_w_zero_point", (np.asarray(w_zp, np.int16) - INT8_OFFSET).astype(np.int8))
        else:
            w_zp_name = self.code_const(f"{b}_w_zero_point", w_zp, layer.weight)
        ins = [src, sx, zx, self.const(f"{b}_w", w), self.const(f"{b}_w_scale", w_scale.astype(np.float32)),
               w_zp_name, sy, zy]
        if layer.bias is not None:
            ins.append(self.const(f"{b}_bias", layer.bias.astype(np.int32)))
        self.node("QLinearConv", ins, [out], f"{b}_qlinearconv", kernel_shape=list(w.shape[2:]), **attrs)

    def conv(self, step: ConvStep):
        raw, src, w, b = f"{step.output}_raw", step.inputs[0], step.layer.weight_codes, step.output
        in_shape = self.shapes[src]
        if step.spatial_dims == 0:  # a channel affine: Reshape to [N, C, 1, prod(...)] and back
            flat = int(np.prod(in_shape[2:], dtype=np.int64))
            self.node("Reshape", [src, self.const(f"{b}_flat", np.array([-1, in_shape[1], 1, flat], np.int64))],
                      [f"{b}_x4"], f"{b}_to_4d")
            src, w, raw4 = f"{b}_x4", w[:, :, None, :], f"{b}_raw4"
        elif step.spatial_dims == 1:  # Conv1d: Unsqueeze -> the Conv2d over [N, C, 1, L] -> Squeeze
            axes = self.const(f"{b}_axes", np.array([2], np.int64))
            self.node("Unsqueeze", [src, axes], [f"{b}_x4"], f"{b}_unsqueeze")
            src, w, raw4 = f"{b}_x4", w[:, :, None, :], f"{b}_raw4"
        else:
            raw4 = raw
        if step.upsample != (1, 1):
            src = self.insert_zero_points(step, src)
        self.conv_like(step, src, raw4, w, strides=list(step.stride), pads=list(step.padding),
                       dilations=list(step.dilation), group=step.groups)
        if step.spatial_dims == 0:
            self.node("Reshape", [raw4, self.const(f"{b}_back", np.array([-1, *in_shape[1:]], np.int64))], [raw],
                      f"{b}_from_4d")
        elif step.spatial_dims == 1:
            self.node("Squeeze", [raw4, axes], [raw], f"{b}_squeeze")
        self.finish(step, raw, *step.clamp_codes())

    def linear(self, step: LinearStep):
        """[N, K]: Unsqueeze -> 1x1 QLinearConv -> Flatten; [N, ..., K]: Reshape to [-1, K] first
        and back to [N, ..., O] after (the rows are independent)."""
        b, src = step.output, step.inputs[0]
        in_shape = self.shapes[src]
        if len(in_shape) > 2:
            self.node("Reshape", [src, self.const(f"{b}_rows", np.array([-1, in_shape[-1]], np.int64))],
                      [f"{b}_x2"], f"{b}_to_rows")
            src = f"{b}_x2"
        x4 = f"{b}_x4"
        self.node("Unsqueeze", [src, self.const(f"{b}_axes", np.array([2, 3], np.int64))], [x4], f"{b}_unsqueeze")
        self.conv_like(step, x4, f"{b}_y4", step.layer.weight_codes[:, :, None, None])
        flat = f"{b}_raw" if len(in_shape) == 2 else f"{b}_y2"
        self.node("Flatten", [f"{b}_y4"], [flat], f"{b}_flatten", axis=1)
        if len(in_shape) > 2:
            out_shape = np.array([-1, *self.shapes[step.output][1:]], np.int64)
            self.node("Reshape", [flat, self.const(f"{b}_shape", out_shape)], [f"{b}_raw"], f"{b}_from_rows")
        self.finish(step, f"{b}_raw", *step.clamp_codes())

    def logits(self, step: LogitsStep):
        """MatMulInteger broadcasts over leading dims: [N, ..., K] works as [N, K]."""
        layer, b = step.layer, step.output
        _, w_zp = layer.weight.channels(layer.out_channels)
        acc = f"{b}_acc"
        self.node("MatMulInteger", [step.inputs[0], self.const(f"{b}_w", np.ascontiguousarray(layer.weight_codes.T)),
                                    self.code_const(f"{b}_x_zero_point", layer.input.zero_point_value,
                                                    layer.input),
                                    self.code_const(f"{b}_w_zero_point", w_zp, layer.weight)], [acc],
                  f"{b}_matmulinteger")
        if layer.bias is not None:
            self.node("Add", [acc, self.const(f"{b}_bias", layer.bias.astype(np.int32))], [f"{b}_acc_bias"],
                      f"{b}_bias_add")
            acc = f"{b}_acc_bias"
        self.node("Cast", [acc], [f"{b}_acc_float"], f"{b}_cast", to=self.tp.FLOAT)
        self.node("Mul", [f"{b}_acc_float", self.const(f"{b}_dequant", step.dequant.astype(np.float32))],
                  [step.output], f"{b}_dequantize")

    def add(self, step: AddStep):
        self.binary(step, "Add", "QLinearAdd" if self.add_op == "qlinearadd" else None)

    def mul(self, step: MulStep):
        self.binary(step, "Mul", None)

    def binary(self, step: AddStep, op: str, ms_op: Optional[str]):
        """Add / Mul of two code tensors: the simulator's float32_rne formula op by op, or the
        com.microsoft QLinear kernel ``ms_op``."""
        b = step.output
        sa, za = self.qparams(f"{b}_a", step.x_q)
        sb, zb = self.qparams(f"{b}_b", step.y_q)
        sy, zy = self.qparams(f"{b}_y", step.quant)
        if ms_op is not None:
            self.node(ms_op, [step.inputs[0], sa, za, step.inputs[1], sb, zb, sy, zy], [f"{b}_raw"],
                      f"{b}_{ms_op.lower()}", domain=MS_DOMAIN)
        else:
            self.node("DequantizeLinear", [step.inputs[0], sa, za], [f"{b}_a_real"], f"{b}_dequantize_a")
            self.node("DequantizeLinear", [step.inputs[1], sb, zb], [f"{b}_b_real"], f"{b}_dequantize_b")
            self.node(op, [f"{b}_a_real", f"{b}_b_real"], [f"{b}_real"], f"{b}_{op.lower()}")
            # Div then QuantizeLinear(scale 1) == QuantizeLinear(scale sy) bit for bit, but onnxruntime
            # does not fuse this pattern into its fixed-point QLinearAdd / QLinearMul kernels
            self.node("Div", [f"{b}_real", sy], [f"{b}_scaled"], f"{b}_div")
            self.node("QuantizeLinear", [f"{b}_scaled", self.const(f"{b}_unit_scale", np.float32(1.0)), zy],
                      [f"{b}_raw"], f"{b}_quantize")
        self.finish(step, f"{b}_raw", *step.clamp_codes())

    @staticmethod
    def _ratio(step: Step) -> np.float32:
        return np.float32(np.float32(step.x_q.scale_value) / np.float32(step.quant.scale_value))

    def global_avg_pool(self, step: GlobalAvgPoolStep):
        raw, src, b = f"{step.output}_raw", step.inputs[0], step.output
        kernel = tuple(self.shapes[src][2:])
        one_d = len(kernel) == 1  # [N, C, L]: pooled as [N, C, 1, L]
        if one_d:
            axes = self.const(f"{b}_axes", np.array([2], np.int64))
            self.node("Unsqueeze", [src, axes], [f"{b}_x4"], f"{b}_unsqueeze")
            src, kernel = f"{b}_x4", (1,) + kernel
        pooled = f"{b}_raw4" if one_d else raw
        self.ones_conv(step, src, pooled, self._ratio(step), float(kernel[0] * kernel[1]), kernel, (1, 1), (0,) * 4)
        if one_d:
            self.node("Squeeze", [pooled, axes], [raw], f"{b}_squeeze")
        self.finish(step, raw, *step.clamp_codes())

    def avg_pool(self, step: AvgPoolStep):
        raw = f"{step.output}_raw"
        (kh, kw), (ph, pw) = step.kernel, step.padding
        self.ones_conv(step, step.inputs[0], raw, self._ratio(step), float(kh * kw), step.kernel, step.stride,
                       (ph, pw, ph, pw))
        self.finish(step, raw, *step.clamp_codes())

    def adaptive_avg_pool(self, step: AdaptiveAvgPoolStep):
        raw, window = f"{step.output}_raw", step.window(*self.shapes[step.inputs[0]][2:])
        self.ones_conv(step, step.inputs[0], raw, self._ratio(step), float(window[0] * window[1]), window, window,
                       (0,) * 4)
        self.finish(step, raw, *step.clamp_codes())

    def max_pool(self, step: MaxPoolStep):
        raw = pooled = f"{step.output}_max"
        self.node("MaxPool", [step.inputs[0]], [pooled], f"{step.output}_maxpool",
                  **max_pool_attrs(step, *self.shapes[step.inputs[0]][2:]))
        if step.x_q != step.quant:
            raw = f"{step.output}_raw"
            self.ones_conv(step, pooled, raw, step.x_q.scale_value, step.quant.scale_value, (1, 1), (1, 1), (0,) * 4)
        self.finish(step, raw, *step.clamp_codes())

    def requant(self, step: RequantStep):
        raw = f"{step.output}_raw"
        if len(self.shapes[step.inputs[0]]) != 4:
            raise ValueError(f"node {step.name!r}: ONNX export of a standalone requantization needs a 4-D tensor")
        self.ones_conv(step, step.inputs[0], raw, step.x_q.scale_value, step.quant.scale_value, (1, 1), (1, 1),
                       (0,) * 4)
        self.finish(step, raw)

    def concat(self, step: ConcatStep):
        parts = []
        for i, (src, xq) in enumerate(zip(step.inputs, step.x_qs)):
            if xq == step.quant:
                parts.append(src)
                continue
            rank, out = len(self.shapes[src]), f"{step.output}_in{i}"
            if rank not in (2, 3, 4):
                raise ValueError(f"node {step.name!r}: ONNX export of a concat requantizes 2-D to 4-D inputs only")
            x4, y4 = (src, out) if rank == 4 else (f"{out}_x4", f"{out}_y4")
            if rank != 4:  # [N, K] -> [N, K, 1, 1]; [N, C, L] -> [N, C, 1, L]
                axes = self.const(f"{out}_axes", np.array([2, 3] if rank == 2 else [2], np.int64))
                self.node("Unsqueeze", [src, axes], [x4], f"{out}_unsqueeze")
            self.ones_conv(step, x4, y4, xq.scale_value, step.quant.scale_value, (1, 1), (1, 1), (0,) * 4,
                           index=i, base=f"{step.output}_requant{i}")
            if rank == 2:
                self.node("Flatten", [y4], [out], f"{out}_flatten", axis=1)
            elif rank == 3:
                self.node("Squeeze", [y4, axes], [out], f"{out}_squeeze")
            parts.append(out)
        self.node("Concat", parts, [f"{step.output}_raw"], f"{step.output}_concat", axis=step.dim)
        self.finish(step, f"{step.output}_raw")

    def clamp(self, step: ClampStep):
        self.clip(step.inputs[0], step.output, step.lo, step.hi, f"{step.output}_clip", step.x_q)

    def reshape(self, step: ReshapeStep):
        self.reshape_node(step, step.inputs[0], step.output)

    def layout(self, step: LayoutStep):
        """Data movement on the codes (``Pad`` fills with the zero point)."""
        self.layout_node(step, step.inputs[0], step.output,
                         lambda: self.code_const(f"{step.output}_fill", np.int64(step.x_q.zero_point_value), step.x_q))

    def dequant(self, step: DequantStep):
        s, z = self.qparams(step.output, step.x_q)
        self.node("DequantizeLinear", [step.inputs[0], s, z], [step.output], f"{step.output}_dequantize")


ONNX_HANDLERS = check_handlers({
    InputStep: _Builder.input, ConvStep: _Builder.conv, LinearStep: _Builder.linear, LogitsStep: _Builder.logits,
    AddStep: _Builder.add, GlobalAvgPoolStep: _Builder.global_avg_pool, AvgPoolStep: _Builder.avg_pool,
    MaxPoolStep: _Builder.max_pool, RequantStep: _Builder.requant, ClampStep: _Builder.clamp,
    ReshapeStep: _Builder.reshape, LookupStep: _Builder.lookup,
    ConcatStep: _Builder.concat, DequantStep: _Builder.dequant,
    LayoutStep: _Builder.layout, MulStep: _Builder.mul, AdaptiveAvgPoolStep: _Builder.adaptive_avg_pool,
}, "the ONNX builder")


def _check_names(pixels, add_op, format: str = FORMATS[0]) -> None:
    check_choice(pixels, PIXELS, "pixels")
    check_choice(add_op, ADD_OPS, "add_op")
    check_choice(format, FORMATS, "format")
    if format == "qdq" and add_op != ADD_OPS[0]:
        raise ValueError(f"add_op={add_op!r} applies to format='qoperator' only (a QDQ graph's adds are "
                         "DequantizeLinear -> Add -> QuantizeLinear; onnxruntime fuses them into QLinearAdd)")


def build_onnx(int_model: IntegerModel, example_input, pixels: str = "float", add_op: str = "exact",
               intermediate: bool = False):
    """QOperator ONNX ModelProto of an integer model (float32_rne); ``example_input`` fixes the shapes.
    ``intermediate``: also output every integer activation (named by its fx node) for checks.
    TypeError unless ``int_model`` is an IntegerModel; ValueError for another rounding, a bad
    ``pixels`` / ``add_op`` or ``example_input`` (:meth:`IntegerModel.check_input`)."""
    require("onnx", "onnx", "ONNX export")
    check_integer_model(int_model)
    _check_names(pixels, add_op)
    example, shapes = example_shapes(int_model, example_input, pixels)
    b = _Builder(int_model, shapes, add_op, pixels)
    for step in int_model.steps:
        ONNX_HANDLERS[type(step)](b, step)
    return assemble(b, example, "pyzeroq_integer", {"": ONNX_OPSET, MS_DOMAIN: MS_OPSET}, IR_VERSION, intermediate)


def export_onnx(qmodel, path, example_input, pixels: str = "float", add_op: str = "exact", format: str = "qoperator"):
    """Write ``qmodel`` as an ONNX graph to ``path``; returns the ModelProto.

    ``format``: "qoperator" (default; :func:`build_onnx`, this module's docstring) or "qdq"
    (:func:`pyzeroq.export_qdq.build_qdq`: float ops between QuantizeLinear / DequantizeLinear,
    weights stored as their codes, sub-byte weights packed into INT4 / UINT4 / INT2 / UINT2).
    The graph takes float images in [0, 1] [N, C, H, W] (``pixels="float"``; the model's
    Normalize runs in float, then QuantizeLinear) or uint8 pixels (``pixels="uint8"``,
    integer only) and returns float32 logits (or the model's tuple / dict of outputs as separate
    graph outputs, named as in the module docstring). QOperator: its outputs equal
    ``pyzeroq.to_integer(qmodel)`` (float32_rne; 2..8-bit codes) on onnxruntime's CPU provider, and
    so does every activation of ``build_onnx(..., intermediate=True)``; QDQ: where it does and where
    it does not is in :mod:`pyzeroq.export_qdq`.
    ``example_input`` ([N, C, H, W]) fixes the per-sample shape (the batch stays dynamic).
    ``add_op`` (QOperator only): "exact" (residual adds as DequantizeLinear, Add, Div, QuantizeLinear:
    the simulator's formula op for op) or "qlinearadd" (com.microsoft QLinearAdd: onnxruntime's
    fixed-point kernel, off by one code where the sum lies within ~2^-22 of a rounding tie).

    Arguments are checked before anything is built: TypeError / ValueError naming ``qmodel``,
    ``path`` (not a path, a directory; FileNotFoundError when its directory does not exist,
    PermissionError when it is not writable), ``example_input`` (not an array or tensor, not
    float / uint8, not 4-D, channels the model does not take, NaN / Inf), ``pixels``, ``add_op``
    or ``format`` (also ``add_op="qlinearadd"`` with ``format="qdq"``).
    """
    onnx = require("onnx", "onnx", "ONNX export")

    path = output_path(path, "path")
    _check_names(pixels, add_op, format)
    int_model = to_integer(qmodel, rounding="float32_rne")
    if format == "qdq":
        model = build_qdq(int_model, example_input, pixels)
    else:
        model = build_onnx(int_model, example_input, pixels, add_op)
    onnx.save(model, str(path))
    return model
