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

from ..modules import QuantAct, functional_pool, is_cat, quant_layers, quantized_source_of
from ..qspec import TensorQuant
from ..quantizers import QuantChannelAffine, QuantConv1d, QuantConvTranspose2d, QuantLinear
from .simulate import requant_multiplier

__all__ = ["integer_exact", "ExactLayer", "ExactAvgPool", "ExactConcat"]

POOL_TYPES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool1d)


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

    def __init__(self, layer: nn.Module, name: str):
        super().__init__()
        self.layer = layer
        self.record = layer.layer_record(name)
        rec = self.record
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
    """An average pool on codes: exact window sums, ``M = f32(f32(sx / sy) / f32(count))``.
    ``pool``: the pooling module (or the equivalent of a functional pool / spatial mean)."""

    def __init__(self, pool: nn.Module, x_q: TensorQuant, y_q: TensorQuant, keepdim: bool = True):
        super().__init__()
        self.pool, self.x_q, self.y_q, self.keepdim = pool, x_q, y_q, keepdim

    def window(self, x: torch.Tensor) -> tuple:
        p = self.pool
        if isinstance(p, nn.AvgPool2d):
            k = p.kernel_size if isinstance(p.kernel_size, tuple) else (p.kernel_size,) * 2
            s = p.stride if isinstance(p.stride, tuple) else (p.stride or p.kernel_size,) * 2
            pad = p.padding if isinstance(p.padding, tuple) else (p.padding,) * 2
            return k, s, pad
        size = p.output_size if isinstance(p.output_size, tuple) else (p.output_size,) * (x.dim() - 2)
        k = tuple(d // o for d, o in zip(x.shape[2:], size))
        return k, k, (0,) * len(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = _centered_codes(x, self.x_q)
        k, s, pad = self.window(x)
        one_d = x.dim() == 3  # [N, C, L] pooled as [N, C, 1, L]
        if one_d:
            c, k, s, pad = c.unsqueeze(2), (1,) + tuple(k), (1,) + tuple(s), (0,) + tuple(pad)
        count = int(np.prod(k))
        # float64 window sums of integers (divisor 1): exact; padding counts as the zero point (a centered 0)
        acc = F.avg_pool2d(c, k, s, pad, count_include_pad=True, divisor_override=1)
        acc = acc.squeeze(2) if one_d else acc
        ratio = np.float32(np.float32(self.x_q.scale_value) / np.float32(self.y_q.scale_value))
        y = _requantize(acc, np.float32(ratio / np.float32(count)), self.y_q, 0, self.y_q.qmax, None)
        return y if self.keepdim else y.flatten(1)


class ExactConcat(nn.Module):
    """``torch.cat`` whose inputs are requantized to the output record as the simulator does
    (``rne(f32(x - z_in) * f32(s_in / s_out)) + z_out``; inputs already on it are copied)."""

    def __init__(self, x_qs: list, y_q: TensorQuant, dim: int):
        super().__init__()
        self.x_qs, self.y_q, self.dim = x_qs, y_q, dim

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        parts = []
        for x, q in zip(xs, self.x_qs):
            if q == self.y_q:
                parts.append(x)
                continue
            ratio = np.float32(np.float32(q.scale_value) / np.float32(self.y_q.scale_value))
            parts.append(_requantize(_centered_codes(x, q), ratio, self.y_q, 0, self.y_q.qmax, None))
        return torch.cat(parts, self.dim)


def _single_quant_user(gm: fx.GraphModule, node: fx.Node) -> Optional[QuantAct]:
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module":
        mod = gm.get_submodule(users[0].target)
        if isinstance(mod, QuantAct):
            return mod
    return None


def _replace(gm: fx.GraphModule, node: fx.Node, module: nn.Module, args: tuple) -> None:
    """Turn ``node`` into a call of ``module`` (same node name: the slot names stay)."""
    name = f"exact_{node.name}"
    gm.add_module(name, module)
    node.op, node.target, node.args, node.kwargs = "call_module", name, args, {}


def _exact_ops(gm: fx.GraphModule) -> None:
    """Pools and concats whose output quantizer follows them directly -> their exact modules."""
    for node in list(gm.graph.nodes):
        out = _single_quant_user(gm, node)
        if out is None or out.mode != "quantize":
            continue
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), POOL_TYPES):
            pool, keepdim = gm.get_submodule(node.target), True
        elif node.op != "call_module" and functional_pool(node) is not None and \
                not isinstance(functional_pool(node)[0], nn.MaxPool2d):
            pool, keepdim = functional_pool(node)
        elif is_cat(node):
            sources = [quantized_source_of(gm, n) for n in node.args[0]]
            if all(s is not None and s.mode == "quantize" for s in sources):
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
                _replace(gm, node, ExactConcat([s.record() for s in sources], out.record(), int(dim)),
                         tuple(node.args[0]))
            continue
        else:
            continue
        src = quantized_source_of(gm, node.args[0])
        if src is not None and src.mode == "quantize":
            _replace(gm, node, ExactAvgPool(pool, src.record(), out.record(), keepdim), (node.args[0],))


def integer_exact(qmodel) -> fx.GraphModule:
    """A copy of ``qmodel``'s fake-quant graph that computes the integer model's arithmetic
    (module docstring): same inputs, same outputs structure, float tensors on the model's device,
    equal to ``pyzeroq.to_integer(qmodel)`` code for code. ``qmodel`` is not changed.

    Raises TypeError for anything but a QuantizedModel, ValueError for a model whose layers are
    not all quantized (float weights or inputs: no integer form)."""
    gm = getattr(qmodel, "graph_module", None)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"qmodel must be a QuantizedModel returned by pyzeroq.quantize, got {type(qmodel).__name__}")
    exact = copy.deepcopy(gm)
    for name, layer in quant_layers(exact).items():
        parent, _, attr = name.rpartition(".")
        setattr(exact.get_submodule(parent) if parent else exact, attr, ExactLayer(layer, name))
    _exact_ops(exact)
    exact.graph.lint()
    exact.recompile()
    return exact.eval()
