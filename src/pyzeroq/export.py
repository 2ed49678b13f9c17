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
ConvStep               ``QLinearConv`` (uint8 per-channel weights and zero points, int32 bias); a Conv1d
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
MaxPoolStep            ``MaxPool`` on uint8 (``ceil_mode`` as torch) [+ 1x1 ones ``QLinearConv`` requantization]
AdaptiveAvgPoolStep    the AvgPoolStep emission with kernel = stride = input size / output size
RequantStep            1x1 depthwise ones ``QLinearConv`` (``M = f32(sx / sy)``)
fused ReLU / ReLU6,    ``Clip`` on uint8 (only where it changes something: the zero point of a
ClampStep, bits < 8    ReLU output is usually 0 and the code of 6.0 usually beyond 255)
ReshapeStep            ``Reshape`` (batch dimension kept dynamic)
ConcatStep             per input whose record differs from the output's: the RequantStep emission (1x1
                       depthwise ones ``QLinearConv``; 2-D inputs through ``Unsqueeze`` / ``Flatten``), then
                       ``Concat`` [+ ``Clip``, bits < 8]
LookupStep             ``Cast(int32)`` -> ``Gather`` from the step's uint8 table (Hardswish, SiLU, GELU,
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
    output_leaves,
)
from .layout_ops import slice_bounds

__all__ = ["export_onnx", "build_onnx", "ONNX_HANDLERS"]

ONNX_OPSET = 17
MS_DOMAIN = "com.microsoft"
MS_OPSET = 1
IR_VERSION = 8
CODE_BITS8 = 8
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
STRUCTURED_OUTPUT_PREFIX = "output"
PIXEL_LEVELS = 256
ADD_OPS = ("exact", "qlinearadd")
PIXELS = ("float", "uint8")


def code_type(q) -> type:
    """ONNX container of the codes of record ``q``: uint8, or int8 for signed codes (bits <= 8)."""
    if q.bits > CODE_BITS8:
        raise ValueError(f"ONNX QOperator codes are 8-bit; a {q.bits}-bit record cannot be exported")
    return np.int8 if q.signed else np.uint8


def code_array(q, values) -> np.ndarray:
    """``values`` (zero points, clip bounds) as an array of ``q``'s ONNX code type."""
    return np.asarray(values).astype(code_type(q))


class _Builder:
    """Collects the ONNX nodes / initializers of one integer model; one method per step type
    (:data:`ONNX_HANDLERS`). ``shapes``: value slot -> shape from a run on the example input."""

    def __init__(self, int_model: IntegerModel, shapes: dict, add_op: str, pixels: str):
        from onnx import TensorProto, helper, numpy_helper
        self.h, self.nh, self.tp = helper, numpy_helper, TensorProto
        self.im = int_model
        self.shapes = shapes
        self.add_op = add_op
        self.pixels = pixels
        self.nodes: list = []
        self.inits: list = []
        self._names: set = set()

    def const(self, base: str, value) -> str:
        name = base
        i = 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        self.inits.append(self.nh.from_array(np.asarray(value), name))
        return name

    def free_names(self, names: set) -> dict:
        """Rename the internal values and initializers called ``names`` (``name_value``) so that
        graph outputs can take those names; returns {old: new}."""
        used = {o for n in self.nodes for o in n.output} | {i.name for i in self.inits} | self._names
        renamed = {}
        for name in sorted(names & used):
            new = f"{name}_value"
            while new in used:
                new = f"{new}_"
            used.add(new)
            renamed[name] = new
        for n in self.nodes:
            for field in (n.input, n.output):
                for i, v in enumerate(field):
                    field[i] = renamed.get(v, v)
        for init in self.inits:
            init.name = renamed.get(init.name, init.name)
        return renamed

    def node(self, op: str, inputs: list, outputs: list, name: str, domain: Optional[str] = None, **attrs):
        self.nodes.append(self.h.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))

    def qparams(self, base: str, q):
        """(scale, zero point) initializers of a per-tensor record: float32 and uint8 / int8 scalars
        (the zero point's type is the codes' type in ONNX)."""
        return (self.const(f"{base}_scale", np.float32(q.scale_value)),
                self.const(f"{base}_zero_point", code_array(q, q.zero_point_value)))

    def clip(self, src: str, out: str, lo: int, hi: int, name: str, q) -> str:
        """Clip of codes of record ``q`` (uint8 / int8 tensor) to [lo, hi], or an Identity when it
        changes nothing."""
        info = np.iinfo(code_type(q))
        if lo <= info.min and hi >= info.max:
            self.node("Identity", [src], [out], name)
        else:
            self.node("Clip", [src, self.const(f"{name}_lo", code_array(q, max(lo, info.min))),
                               self.const(f"{name}_hi", code_array(q, min(hi, info.max)))], [out], name)
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
               self.const(f"{b}_x_zero_point", code_array(xq, xq.zero_point_value)),
               self.const(f"{b}_w", code_array(xq, np.ones((channels, 1) + tuple(kernel)))),  # x's type: S8S8 / U8U8
               self.const(f"{b}_w_scale", np.float32(1.0)), self.const(f"{b}_w_zero_point", code_array(xq, 0)),
               self.const(f"{b}_y_scale", np.float32(y_scale)),
               self.const(f"{b}_y_zero_point", code_array(yq, yq.zero_point_value))]
        self.node("QLinearConv", ins, [out], b, group=int(channels), kernel_shape=list(kernel), strides=list(stride),
                  pads=list(pads))

    def channel_shape(self) -> tuple:
        """[1, C, 1, ...]: per-channel constants broadcast over an input of the example's rank."""
        return (1, -1) + (1,) * (len(self.shapes[self.im.steps[0].output]) - 2)

    # ------------------------------------------------------------------ steps
    def input(self, step: InputStep):
        raw = f"{step.output}_raw"
        if self.pixels == "uint8":
            lut = self.im.input_lut
            idx = f"{step.output}_index"
            self.node("Cast", [INPUT_NAME], [idx], f"{step.output}_cast", to=self.tp.INT32)
            if lut.shape[0] > 1:
                offs = (np.arange(lut.shape[0], dtype=np.int32) * PIXEL_LEVELS).reshape(self.channel_shape())
                self.node("Add", [idx, self.const(f"{step.output}_channel_offset", offs)], [f"{idx}_c"],
                          f"{step.output}_offset")
                idx = f"{idx}_c"
            self.node("Gather", [self.const(f"{step.output}_lut", lut.reshape(-1)), idx], [raw],
                      f"{step.output}_lookup", axis=0)
            self.node("Identity", [raw], [step.output], f"{step.output}_codes")
            return
        src = INPUT_NAME
        if step.mean is not None:
            mean = np.asarray(step.mean, np.float32).reshape(self.channel_shape())
            std = np.asarray(step.std, np.float32).reshape(self.channel_shape())
            self.node("Sub", [src, self.const("normalize_mean", mean)], ["normalize_centered"], "normalize_sub")
            self.node("Div", ["normalize_centered", self.const("normalize_std", std)], ["normalized"], "normalize_div")
            src = "normalized"
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
        ins = [src, sx, zx, self.const(f"{b}_w", w), self.const(f"{b}_w_scale", w_scale.astype(np.float32)),
               self.const(f"{b}_w_zero_point", code_array(layer.weight, w_zp)), sy, zy]
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

    def insert_zero_points(self, step: ConvStep, src: str) -> str:
        """[N, C, H, W] -> [N, C, (H-1)*uh+1, (W-1)*uw+1] with the zero point between the pixels
        (a transposed conv's input): Reshape to [N, C, H, 1, W, 1], Pad with the zero point to
        [N, C, H, uh, W, uw], Reshape, Slice off the trailing fill."""
        b, (uh, uw) = step.output, step.upsample
        _, c, h, w = self.shapes[src]
        self.node("Reshape", [src, self.const(f"{b}_split", np.array([-1, c, h, 1, w, 1], np.int64))],
                  [f"{b}_x6"], f"{b}_reshape6")
        pads = np.array([0] * 6 + [0, 0, 0, uh - 1, 0, uw - 1], np.int64)
        self.node("Pad", [f"{b}_x6", self.const(f"{b}_pads", pads),
                          self.const(f"{b}_fill", code_array(step.layer.input, step.layer.input.zero_point_value))],
                  [f"{b}_filled"],
                  f"{b}_pad", mode="constant")
        self.node("Reshape", [f"{b}_filled", self.const(f"{b}_merge", np.array([-1, c, h * uh, w * uw], np.int64))],
                  [f"{b}_spread"], f"{b}_reshape4")
        self.node("Slice", [f"{b}_spread", self.const(f"{b}_starts", np.array([0, 0], np.int64)),
                            self.const(f"{b}_ends", np.array([(h - 1) * uh + 1, (w - 1) * uw + 1], np.int64)),
                            self.const(f"{b}_axes", np.array([2, 3], np.int64))], [f"{b}_zeros_in"], f"{b}_slice")
        return f"{b}_zeros_in"

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
                                    self.const(f"{b}_x_zero_point", code_array(layer.input,
                                                                               layer.input.zero_point_value)),
                                    self.const(f"{b}_w_zero_point", code_array(layer.weight, w_zp))], [acc],
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
        ph, pw = step.padding
        self.node("MaxPool", [step.inputs[0]], [pooled], f"{step.output}_maxpool", kernel_shape=list(step.kernel),
                  strides=list(step.stride), pads=[ph, pw, ph, pw], ceil_mode=int(step.ceil_mode))
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
            if rank not in (2, 4):
                raise ValueError(f"node {step.name!r}: ONNX export of a concat requantizes 2-D or 4-D inputs only")
            x4, y4 = (src, out) if rank == 4 else (f"{out}_x4", f"{out}_y4")
            if rank == 2:  # [N, K] -> [N, K, 1, 1]
                self.node("Unsqueeze", [src, self.const(f"{out}_axes", np.array([2, 3], np.int64))], [x4],
                          f"{out}_unsqueeze")
            self.ones_conv(step, x4, y4, xq.scale_value, step.quant.scale_value, (1, 1), (1, 1), (0,) * 4,
                           index=i, base=f"{step.output}_requant{i}")
            if rank == 2:
                self.node("Flatten", [y4], [out], f"{out}_flatten", axis=1)
            parts.append(out)
        self.node("Concat", parts, [f"{step.output}_raw"], f"{step.output}_concat", axis=step.dim)
        self.finish(step, f"{step.output}_raw")

    def clamp(self, step: ClampStep):
        self.clip(step.inputs[0], step.output, step.lo, step.hi, f"{step.output}_clip", step.x_q)

    def reshape(self, step: ReshapeStep):
        """``Reshape`` whose target keeps the batch size dynamic (:func:`reshape_target`)."""
        target = reshape_target(step, self.shapes[step.inputs[0]], self.shapes[step.output])
        self.node("Reshape", [step.inputs[0], self.const(f"{step.output}_shape", np.array(target, np.int64))],
                  [step.output], f"{step.output}_reshape")

    def lookup(self, step: LookupStep):
        b = step.output
        self.node("Cast", [step.inputs[0]], [f"{b}_index"], f"{b}_cast", to=self.tp.INT32)
        self.node("Gather", [self.const(f"{b}_table", step.table), f"{b}_index"], [b], f"{b}_lookup", axis=0)

    def layout(self, step: LayoutStep):
        src, out, b = step.inputs[0], step.output, step.output
        rank = len(self.shapes[src])
        if step.op in ("permute", "transpose"):
            perm = [d % rank for d in step.args] if step.op == "permute" else list(range(rank))
            if step.op == "transpose":
                i, j = (d % rank for d in step.args)
                perm[i], perm[j] = perm[j], perm[i]
            self.node("Transpose", [src], [out], f"{b}_transpose", perm=perm)
        elif step.op == "upsample":  # nearest, integer factors: output index i reads floor(i / f)
            scales = np.array([1.0] * (rank - 2) + [float(f) for f in step.args], np.float32)
            self.node("Resize", [src, "", self.const(f"{b}_scales", scales)], [out], f"{b}_resize", mode="nearest",
                      coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        elif step.op == "pad":  # torch (last dim first) -> ONNX [begins..., ends...], filled with the zero point
            begins, ends = [0] * rank, [0] * rank
            for i in range(len(step.args) // 2):
                begins[rank - 1 - i], ends[rank - 1 - i] = step.args[2 * i], step.args[2 * i + 1]
            self.node("Pad", [src, self.const(f"{b}_pads", np.array(begins + ends, np.int64)),
                              self.const(f"{b}_fill", code_array(step.x_q, step.x_q.zero_point_value))], [out],
                      f"{b}_pad",
                      mode="constant")
        else:  # an item of chunk / split: a Slice along its dim
            dim = step.args[0] % rank
            start, stop = slice_bounds(step.op, step.args, self.shapes[src][dim])
            self.node("Slice", [src, self.const(f"{b}_starts", np.array([start], np.int64)),
                                self.const(f"{b}_ends", np.array([stop], np.int64)),
                                self.const(f"{b}_axes", np.array([dim], np.int64))], [out], f"{b}_slice")

    def dequant(self, step: DequantStep):
        s, z = self.qparams(step.output, step.x_q)
        self.node("DequantizeLinear", [step.inputs[0], s, z], [step.output], f"{step.output}_dequantize")


def _reads_batch(entry) -> bool:
    """A ReshapeStep shape entry that depends on the batch size (dim 0 of a tensor)."""
    if entry == "batch":
        return True
    if isinstance(entry, tuple):
        return (entry[0] == "size" and entry[2] == 0) or any(_reads_batch(e) for e in entry[1:])
    return False


def reshape_target(step: ReshapeStep, in_shape: tuple, out_shape: tuple) -> list:
    """The ONNX Reshape target of a ReshapeStep: the example's output shape with the dims that
    depend on the batch size made dynamic -- flatten: 0 (copy) before the merged dims, -1 for the
    merged dims; view / reshape: the one batch-dependent entry -1 (or 0, a copy of the input's
    dim 0, when it is a batch size at dim 0 and a -1 is already there). ValueError when two entries depend on the batch."""
    if step.flatten is not None:
        start = step.flatten[0] % len(in_shape)
        return [0] * start + [-1] + list(out_shape[start + 1:])
    target, dynamic = list(out_shape), [i for i, d in enumerate(step.shape) if _reads_batch(d)]
    has_minus_one = -1 in step.shape
    for i, d in enumerate(step.shape):
        if d == -1:
            target[i] = -1
    if not dynamic:
        return target
    if len(dynamic) == 1 and not has_minus_one:
        target[dynamic[0]] = -1
    elif dynamic == [0] and (step.shape[0] == "batch" or step.shape[0][0] == "size") and \
            out_shape[0] == in_shape[0]:
        target[0] = 0  # a batch size equal to the input's dim 0: copied
    else:
        raise ValueError(f"node {step.name!r}: a reshape with more than one batch-dependent dimension cannot be "
                         f"exported with a dynamic batch (shape {step.shape})")
    return target


def output_names(spec) -> list:
    """[(ONNX output name, slot)]: one tensor -> "logits"; a structure -> its keys / indices
    joined by "." (a dict ``{"boxes": ..., "scores": ...}`` -> "boxes", "scores"; a tuple ->
    "output.0", "output.1")."""
    if isinstance(spec, str):
        return [(OUTPUT_NAME, spec)]
    names = []
    for path, slot in output_leaves(spec):
        name = ".".join(str(p) for p in path)
        names.append((name if isinstance(path[0], str) else f"{STRUCTURED_OUTPUT_PREFIX}.{name}", slot))
    return names


ONNX_HANDLERS = check_handlers({
    InputStep: _Builder.input, ConvStep: _Builder.conv, LinearStep: _Builder.linear, LogitsStep: _Builder.logits,
    AddStep: _Builder.add, GlobalAvgPoolStep: _Builder.global_avg_pool, AvgPoolStep: _Builder.avg_pool,
    MaxPoolStep: _Builder.max_pool, RequantStep: _Builder.requant, ClampStep: _Builder.clamp,
    ReshapeStep: _Builder.reshape, LookupStep: _Builder.lookup,
    ConcatStep: _Builder.concat, DequantStep: _Builder.dequant,
    LayoutStep: _Builder.layout, MulStep: _Builder.mul, AdaptiveAvgPoolStep: _Builder.adaptive_avg_pool,
}, "the ONNX builder")


def _check_names(pixels, add_op) -> None:
    if not isinstance(pixels, str) or pixels not in PIXELS:
        raise ValueError(f"pixels must be one of {PIXELS}, got {pixels!r}")
    if not isinstance(add_op, str) or add_op not in ADD_OPS:
        raise ValueError(f"add_op must be one of {ADD_OPS}, got {add_op!r}")


def build_onnx(int_model: IntegerModel, example_input, pixels: str = "float", add_op: str = "exact",
               intermediate: bool = False):
    """ONNX ModelProto of an integer model (float32_rne); ``example_input`` fixes the shapes.
    ``intermediate``: also output every integer activation (named by its fx node) for checks."""
    onnx = require("onnx", "onnx", "ONNX export")
    from onnx import TensorProto, helper

    if int_model.rounding != "float32_rne":
        raise ValueError(f"ONNX export needs rounding='float32_rne' (onnxruntime's arithmetic), "
                         f"got {int_model.rounding!r}")
    _check_names(pixels, add_op)
    if not isinstance(int_model, IntegerModel):
        raise TypeError(f"int_model must be a pyzeroq IntegerModel (pyzeroq.to_integer), got {type(int_model).__name__}")
    example = int_model.check_input(example_input, "example_input")
    if pixels == "uint8" and example.dtype != np.uint8:
        example = np.clip(np.rint(example.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    env = int_model.run(example)
    shapes = {k: tuple(v.shape) for k, v in env.items()}
    b = _Builder(int_model, shapes, add_op, pixels)
    for step in int_model.steps:
        ONNX_HANDLERS[type(step)](b, step)
    batch = "N"
    in_type = TensorProto.UINT8 if pixels == "uint8" else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(INPUT_NAME, in_type, [batch] + list(example.shape[1:]))]
    wanted = output_names(int_model.output)
    renamed = b.free_names({name for name, _ in wanted})
    outputs, taken = [], {INPUT_NAME}
    for name, slot in wanted:
        while name in taken:  # the graph input's name, or the same key twice
            name = f"{name}_output"
        taken.add(name)
        b.node("Identity", [renamed.get(slot, slot)], [name], f"{name}_output")
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch] + list(shapes[slot][1:])))
    if intermediate:
        outputs += [helper.make_tensor_value_info(renamed.get(st.output, st.output), TensorProto.UINT8,
                                                  [batch] + list(shapes[st.output][1:]))
                    for st in int_model.steps if st.out_q is not None]
    graph = helper.make_graph(b.nodes, "pyzeroq_integer", inputs, outputs, b.inits)
    model = helper.make_model(graph, producer_name="pyzeroq",
                              opset_imports=[helper.make_opsetid("", ONNX_OPSET),
                                             helper.make_opsetid(MS_DOMAIN, MS_OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def export_onnx(qmodel, path, example_input, pixels: str = "float", add_op: str = "exact"):
    """Write ``qmodel`` as a QOperator ONNX graph to ``path``; returns the ModelProto.

    The graph takes float images in [0, 1] [N, C, H, W] (``pixels="float"``; the model's
    Normalize runs in float, then QuantizeLinear) or uint8 pixels (``pixels="uint8"``,
    integer only) and returns float32 logits (or the model's tuple / dict of outputs as separate
    graph outputs, named as in the module docstring). Its outputs equal ``pyzeroq.to_integer(qmodel)``
    (float32_rne; 2..8-bit codes) on onnxruntime's CPU provider, and so does every activation
    of ``build_onnx(..., intermediate=True)``.
    ``example_input`` ([N, C, H, W]) fixes the per-sample shape (the batch stays dynamic).
    ``add_op``: "exact" (residual adds as DequantizeLinear, Add, Div, QuantizeLinear: the
    simulator's formula op for op) or "qlinearadd" (com.microsoft QLinearAdd: onnxruntime's
    fixed-point kernel, off by one code where the sum lies within ~2^-22 of a rounding tie).

    Arguments are checked before anything is built: TypeError / ValueError naming ``qmodel``,
    ``path`` (not a path, a directory; FileNotFoundError when its directory does not exist,
    PermissionError when it is not writable), ``example_input`` (not an array or tensor, not
    float / uint8, not 4-D, channels the model does not take, NaN / Inf), ``pixels`` or ``add_op``.
    """
    onnx = require("onnx", "onnx", "ONNX export")

    path = output_path(path, "path")
    _check_names(pixels, add_op)
    int_model = to_integer(qmodel, rounding="float32_rne")
    model = build_onnx(int_model, example_input, pixels, add_op)
    onnx.save(model, str(path))
    return model
