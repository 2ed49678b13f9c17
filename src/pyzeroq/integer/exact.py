"""Integer-exact fake quantization: the fake-quant graph computing as the integer simulator does.

The default fake-quant model rounds ``f32(float conv output) / y_scale``; the integer model
rounds ``f32(int32 acc) * M``. :func:`integer_exact` returns a copy of a quantized model's graph
in which every op whose float form can round differently computes the integer model's
arithmetic in torch (float64 holds every int32 accumulator exactly), on any device, batched:

* conv / linear layers (:class:`ExactLayer`): ``acc = bias + conv(x - zx, w - zw)`` in float64,
  then ``y = clamp(rne(f32(acc) * f32(f32(sx * sw[c]) / sy)), lo, hi)`` (the fused clamp of the
  record), returned dequantized ``f32(y - zy) * sy``; logits ``f32(acc) * f32(sx * sw[c])``;
* average pools (global, windowed, adaptive; modules and functionals) and ``torch.cat``'s input
  requantizations (:class:`ExactAvgPool`, :class:`ExactConcat`): exact sums, one float32
  requantization with the simulator's multiplier.

Everything else (input quantization, add, mul, lookup tables, max pool, layout ops) already
computes the simulator's formula. Every activation quantizer after an exact op sees values on its
own grid, so its re-quantization returns the same codes. The result equals
``pyzeroq.to_integer(qmodel)`` (``rounding="float32_rne"``, no accumulator overflow) code for
code; tests/test_zoo.py checks it on the whole model zoo.
"""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._checks import float_images
from ..modules import quant_layers
from ..qspec import LayerQuant, TensorQuant
from ..quantizers import QuantChannelAffine, QuantConv1d, QuantConvTranspose2d, QuantLinear
from .plan import compile_plan
from .simulate import requant_multiplier
from .steps import LAYER_STEPS, AdaptiveAvgPoolStep, AvgPoolStep, ConcatStep, GlobalAvgPoolStep, Step

__all__ = ["integer_exact", "ExactLayer", "ExactAvgPool", "ExactConcat"]



def _centered_codes(x: torch.Tensor, q: TensorQuant) -> torch.Tensor:
    """``x`` (dequantized values on the grid of ``q``) -> ``code - zero_point`` as float64."""
    return torch.round(x / torch.tensor(np.float32(q.scale_value), device=x.device)).double()


def _requantize(acc: torch.Tensor, mult, q: TensorQuant, lo: int, hi: int, channel_dim: Optional[int]):
    """The simulator's float32_rne requantization of an exact accumulator (float64), returned
    dequantized: ``f32(rne(clamp(f32(acc) * m32, lo - zy, hi - zy))) * sy``."""
    m = torch.as_tensor(np.asarray(mult, np.float32), device=acc.device)
    if channel_dim is not None and m.numel() > 1:
        shape = [1] * acc.dim()
        shape[channel_dim] = -1
        m = m.view(shape)
    z = q.zero_point_value
    f = torch.clamp(acc.float() * m, float(lo - z), float(hi - z))
    return torch.round(f) * torch.tensor(np.float32(q.scale_value), device=acc.device)


class ExactLayer(nn.Module):
    """A quantized conv / linear computing its integer form (module docstring) from its record."""

    def __init__(self, layer: nn.Module, record: LayerQuant):
        super().__init__()
        self.layer, self.record = layer, record
        rec = record
        w_scale, w_zp = rec.weight.channels(rec.out_channels)
        shape = (-1,) + (1,) * (rec.weight_codes.ndim - 1)
        centered = rec.weight_codes.astype(np.float64) - w_zp.astype(np.float64).reshape(shape)
        self.register_buffer("weight_centered", torch.from_numpy(centered).to(layer.weight.device))
        bias = None if rec.bias is None else torch.from_numpy(rec.bias.astype(np.float64)).to(layer.weight.device)
        self.register_buffer("bias_codes", bias)
        if rec.output is not None:
            self.mult = requant_multiplier(rec.input.scale_value, w_scale, rec.output.scale_value)
            self.clamp = rec.clamp_codes()

    def accumulate(self, c: torch.Tensor) -> torch.Tensor:
        layer, w, b = self.layer, self.weight_centered, self.bias_codes
        if isinstance(layer, QuantLinear):
            return F.linear(c, w, b)
        if isinstance(layer, QuantConvTranspose2d):  # the conv-layout weight mapped back, as its forward
            return F.conv_transpose2d(c, w.flip(2, 3).transpose(0, 1), b, layer.transpose_stride,
                                      layer.transpose_padding, layer.output_padding, 1, layer.dilation)
        conv = F.conv1d if isinstance(layer, QuantConv1d) else F.conv2d
        if layer.padding_mode != "zeros":
            raise ValueError(f"layer {self.record.name!r}: padding_mode={layer.padding_mode!r} has no integer form")
        if isinstance(layer, QuantChannelAffine):  # over [N, C, ...] of any rank
            flat = conv(c.reshape(c.shape[0], c.shape[1], -1), w, b, layer.stride, layer.padding, layer.dilation,
                        layer.groups)
            return flat.reshape(c.shape)
        return conv(c, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer.quantize_input(x)
        acc = self.accumulate(_centered_codes(x, self.record.input))
        channel_dim = -1 if isinstance(self.layer, QuantLinear) else 1
        if self.record.output is None:  # logits: the dequantized accumulator
            scale = torch.from_numpy(np.asarray(self.record.bias_scale, np.float32)).to(acc.device)
            return acc.float() * (scale if channel_dim == -1 else scale.view(1, -1, *[1] * (acc.dim() - 2)))
        return _requantize(acc, self.mult, self.record.output, *self.clamp, channel_dim)


class ExactAvgPool(nn.Module):
    """An average pool on codes as the integer plan's ``step`` runs it (AvgPoolStep, GlobalAvgPoolStep
    or AdaptiveAvgPoolStep): exact window sums, ``M = f32(f32(sx / sy) / f32(count))``, the step's
    clamp; ``keepdim`` False: [N, C, 1, 1] flattened to [N, C] (a spatial mean)."""

    def __init__(self, step: Step, keepdim: bool = True):
        super().__init__()
        self.step, self.keepdim = step, keepdim

    def window(self, x: torch.Tensor) -> tuple:
        """(kernel, stride, padding) over the last two dims of ``x`` ([N, C, L] seen as [N, C, 1, L])."""
        size = (1,) * (4 - x.dim()) + tuple(x.shape[2:])
        if isinstance(self.step, AvgPoolStep):
            return self.step.kernel, self.step.stride, self.step.padding
        kernel = self.step.window(*size) if isinstance(self.step, AdaptiveAvgPoolStep) else size
        return kernel, kernel, (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, yq = self.step.x_q, self.step.quant
        c = _centered_codes(x, xq)
        one_d = x.dim() == 3
        kernel, stride, padding = self.window(x)
        # float64 window sums of integers (divisor 1): exact; padding counts as the zero point (a centered 0)
        acc = F.avg_pool2d(c.unsqueeze(2) if one_d else c, kernel, stride, padding, count_include_pad=True,
                           divisor_override=1)
        acc = acc.squeeze(2) if one_d else acc
        count = np.float32(kernel[0] * kernel[1])
        ratio = np.float32(np.float32(xq.scale_value) / np.float32(yq.scale_value))
        y = _requantize(acc, np.float32(ratio / count), yq, *self.step.clamp_codes(), None)
        return y if self.keepdim else y.flatten(1)


class ExactConcat(nn.Module):
    """``torch.cat`` as the plan's ConcatStep runs it: inputs requantized to the output record
    (``rne(f32(x - z_in) * f32(s_in / s_out)) + z_out``; inputs already on it are copied)."""

    def __init__(self, step: ConcatStep):
        super().__init__()
        self.step = step

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        parts, yq = [], self.step.quant
        for x, q in zip(xs, self.step.x_qs):
            if q == yq:
                parts.append(x)
                continue
            ratio = np.float32(np.float32(q.scale_value) / np.float32(yq.scale_value))
            parts.append(_requantize(_centered_codes(x, q), ratio, yq, yq.qmin, yq.qmax, None))
        return torch.cat(parts, self.step.dim)


def _replace(gm: fx.GraphModule, node: fx.Node, module: nn.Module, args: tuple) -> None:
    """Turn ``node`` into a call of ``module`` (same node name: the slot names stay)."""
    name = f"exact_{node.name}"
    gm.add_module(name, module)
    node.op, node.target, node.args, node.kwargs = "call_module", name, args, {}


def _exact_ops(gm: fx.GraphModule, steps: dict) -> None:
    """Average pools and concats -> modules running their plan steps (``steps``: slot -> step)."""
    for node in list(gm.graph.nodes):
        # a spatial mean without keepdim: the pool step writes "<node>_pool", a reshape writes "<node>"
        step = steps.get(f"{node.name}_pool", steps.get(node.name))
        if isinstance(step, (AvgPoolStep, GlobalAvgPoolStep, AdaptiveAvgPoolStep)):
            _replace(gm, node, ExactAvgPool(step, keepdim=step.output == node.name), (node.args[0],))
        elif isinstance(step, ConcatStep):
            _replace(gm, node, ExactConcat(step), tuple(node.args[0]))


def integer_exact(qmodel) -> fx.GraphModule:
    """A copy of ``qmodel``'s fake-quant graph that computes the integer model's arithmetic
    (module docstring): same inputs, same outputs structure, float tensors on the model's device,
    equal to ``pyzeroq.to_integer(qmodel)`` code for code. ``qmodel`` is not changed.

    Raises TypeError for anything but a QuantizedModel, and the errors of
    :func:`pyzeroq.integer.plan.compile_plan` (ValueErrors) for a model without an integer form."""
    gm = getattr(qmodel, "graph_module", None)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"qmodel must be a QuantizedModel returned by pyzeroq.quantize, got {type(qmodel).__name__}")
    steps = {step.output: step for step in compile_plan(gm).steps}  # the plan's errors for what has no integer form
    records = {step.name: step.layer for step in steps.values() if isinstance(step, LAYER_STEPS)}
    exact = copy.deepcopy(gm)
    for name, layer in quant_layers(exact).items():
        parent, _, attr = name.rpartition(".")
        setattr(exact.get_submodule(parent) if parent else exact, attr, ExactLayer(layer, records[name]))
    _exact_ops(exact, steps)
    for node in [n for n in exact.graph.nodes if n.op == "placeholder"]:  # integer pixels: as the fake-quant model
        with exact.graph.inserting_after(node):
            checked = exact.graph.call_function(float_images, (node,))
        node.replace_all_uses_with(checked, delete_user_cb=lambda user, checked=checked: user is not checked)
    exact.graph.lint()
    exact.recompile()
    return exact.eval()
