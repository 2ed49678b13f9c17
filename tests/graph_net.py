"""The fx-traceable module of a graph-fuzzer spec (:class:`FuzzNet`).

``forward`` loops over the fixed op list (fx unrolls it at trace time); every op is written the
way user models write it (modules, ``F.*`` / ``torch.*`` functions, tensor methods, sizes read
from ``x.size()`` / ``x.shape``).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F
from graph_spec import (
    Act,
    Add,
    Cat,
    Conv,
    Conv1d,
    ConvT,
    Flatten,
    GraphSpec,
    Layout,
    Linear,
    Mul,
    Norm,
    Out,
    Passthrough,
    Pool,
    Reshape,
    Shuffle,
    infer_shapes,
)
from graph_weights import batch_norm, set_weights
from torch import nn

from pyzeroq.models.layers import Normalize

_ACT_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid,
                "silu": nn.SiLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
                "leaky_relu": lambda: nn.LeakyReLU(0.1), "hardtanh": lambda: nn.Hardtanh(-0.5, 2.0)}
_ACT_FUNCTIONS = {"f_relu": F.relu, "f_relu6": F.relu6, "f_hardswish": F.hardswish, "f_hardsigmoid": F.hardsigmoid,
                  "f_silu": F.silu, "f_gelu": F.gelu, "f_sigmoid": F.sigmoid, "f_tanh": F.tanh,
                  "f_leaky_relu": F.leaky_relu, "f_hardtanh": F.hardtanh, "torch_sigmoid": torch.sigmoid,
                  "torch_tanh": torch.tanh}
_POOL_MODULES = ("gap", "max", "avg", "adaptive", "gap1d")
_ARITH = {"floordiv": operator.floordiv, "mul": operator.mul, "add": operator.add, "sub": operator.sub}


class Normalize1d(nn.Module):
    """(x - mean) / std of [N, C, L] signals (per-channel buffers [1, C, 1])."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _bias(init) -> bool:
    return init.bias is not None or bool(init.const)


def _layer(op, shapes: list, key: str, layers: nn.ModuleDict) -> None:
    """Register the module(s) of a conv / linear / BN op."""
    cin = shapes[op.src][0] if not isinstance(op, Linear) else shapes[op.src][-1]
    if isinstance(op, (Conv, Conv1d)):
        cls = nn.Conv2d if isinstance(op, Conv) else nn.Conv1d
        layer = cls(cin, op.out, op.kernel, stride=op.stride, padding=op.padding, dilation=op.dilation,
                    groups=op.groups, bias=_bias(op.init))
        set_weights(layer, op.init)
    elif isinstance(op, ConvT):
        layer = nn.ConvTranspose2d(cin, op.out, op.kernel, stride=op.stride, padding=op.padding,
                                   output_padding=op.output_padding, dilation=op.dilation, bias=_bias(op.init))
        set_weights(layer, op.init, transposed=True)
    elif isinstance(op, Norm):
        layer = batch_norm(op.bn, cin, 2 if len(shapes[op.src]) == 3 else 1)
    else:
        layer = nn.Linear(cin, op.out, bias=_bias(op.init))
        set_weights(layer, op.init)
    layers[key] = layer
    if isinstance(op, (Conv, Conv1d, ConvT)) and op.bn is not None:
        layers[key + "_bn"] = batch_norm(op.bn, op.out, 1 if isinstance(op, Conv1d) else 2)


def _module(op, key: str, layers: nn.ModuleDict) -> None:
    """Register the module of a pool / passthrough / flatten / layout op written as a module."""
    if isinstance(op, Pool) and op.kind in _POOL_MODULES:
        layers[key] = (nn.AdaptiveAvgPool2d(1) if op.kind == "gap" else
                       nn.AdaptiveAvgPool1d(1) if op.kind == "gap1d" else
                       nn.AdaptiveAvgPool2d(op.kernel) if op.kind == "adaptive" else
                       nn.MaxPool2d(op.kernel, op.stride, op.padding, ceil_mode=op.ceil) if op.kind == "max" else
                       nn.AvgPool2d(op.kernel, op.stride, op.padding))
    elif isinstance(op, Pool):
        return
    elif isinstance(op, Passthrough):
        layers[key] = nn.Identity() if op.kind == "identity" else nn.Dropout(0.5)
    elif isinstance(op, Flatten) and op.style == "module":
        layers[key] = nn.Flatten()
    elif isinstance(op, Layout) and op.kind == "upsample":
        fh, fw = op.args
        layers[key] = nn.Upsample(scale_factor=fh if fh == fw else (float(fh), float(fw)), mode="nearest")
    elif isinstance(op, Layout) and op.kind == "zeropad":
        layers[key] = nn.ZeroPad2d(op.args)


class FuzzNet(nn.Module):
    """The fx-traceable module of a :class:`GraphSpec` (eval mode)."""

    def __init__(self, spec: GraphSpec):
        super().__init__()
        self.spec = spec
        self.ops = spec.ops
        one_d = len(spec.input_shape) == 2
        self.normalize = Normalize1d(spec.mean, spec.std) if one_d else Normalize(spec.mean, spec.std)
        self.layers = nn.ModuleDict()
        shapes = infer_shapes(spec)
        self.features = [shapes[i + 1][0] for i in range(len(spec.ops))]
        for i, op in enumerate(spec.ops):
            key = f"op{i}"
            if isinstance(op, (Conv, Conv1d, ConvT, Norm, Linear)):
                _layer(op, shapes, key, self.layers)
            else:
                _module(op, key, self.layers)
            act = getattr(op, "act", None) if not isinstance(op, Act) else op.kind
            if act in _ACT_MODULES:
                self.layers[key + "_act"] = _ACT_MODULES[act]()
        self.eval()

    def _act(self, key: str, kind: Optional[str], x):
        if kind in _ACT_MODULES:
            return self.layers[key + "_act"](x)
        if kind in _ACT_FUNCTIONS:
            return _ACT_FUNCTIONS[kind](x)
        if kind == "m_sigmoid":
            return x.sigmoid()
        if kind == "m_tanh":
            return x.tanh()
        return x

    def forward(self, x):
        vals = [self.normalize(x)]
        splits: dict = {}  # (src, kind, param, dim) -> the chunk / split result its items index
        for i, op in enumerate(self.ops):
            key = f"op{i}"
            if isinstance(op, (Conv, Conv1d, ConvT, Linear, Norm)):
                y = self.layers[key](vals[op.src])
                if isinstance(op, (Conv, Conv1d, ConvT)) and op.bn is not None:
                    y = self.layers[key + "_bn"](y)
                y = self._act(key, op.act, y)
            elif isinstance(op, Add):
                y = torch.add(vals[op.a], vals[op.b]) if op.style == "torch" else vals[op.a] + vals[op.b]
                y = self._act(key, op.act, y)
            elif isinstance(op, Mul):
                y = torch.mul(vals[op.a], vals[op.b]) if op.style == "torch" else vals[op.a] * vals[op.b]
                y = self._act(key, op.act, y)
            elif isinstance(op, Act):
                y = self._act(key, op.kind, vals[op.src])
            elif isinstance(op, Flatten):
                y = self._flatten(key, i, op, vals[op.src])
            elif isinstance(op, Cat):
                y = torch.cat([vals[j] for j in op.srcs], dim=op.dim)
            elif isinstance(op, Pool) and op.kind not in _POOL_MODULES:
                y = _functional_pool(op, vals[op.src])
            elif isinstance(op, Layout):
                y = self._layout(key, op, vals[op.src], splits)
            elif isinstance(op, Reshape):
                y = _reshape(op, vals)
            elif isinstance(op, Shuffle):
                y = channel_shuffle(vals[op.src], op)
            else:  # Pool (modules), Passthrough
                y = self.layers[key](vals[op.src])
            vals.append(y)
        return vals[-1] if self.spec.outputs is None else _structure(self.spec.outputs, vals)

    def _flatten(self, key: str, i: int, op: Flatten, v):
        if op.style == "module":
            return self.layers[key](v)
        if op.style == "view":
            return v.view(v.size(0), -1)
        if op.style == "reshape":
            return v.reshape(v.size(0), -1)
        if op.style == "view_int":
            return v.view(-1, self.features[i])
        if op.style == "reshape_int":
            return v.reshape(-1, self.features[i])
        if op.style == "method":
            return v.flatten(1)
        return torch.flatten(v, 1)

    def _layout(self, key: str, op: Layout, v, splits: dict):
        k, a = op.kind, op.args
        if k in ("upsample", "zeropad"):
            return self.layers[key](v)
        if k == "interpolate":
            return F.interpolate(v, scale_factor=a[0] if a[0] == a[1] else (float(a[0]), float(a[1])), mode="nearest")
        if k == "pad":
            return F.pad(v, a)
        if k == "permute":
            return v.permute(*a)
        if k == "torch_permute":
            return torch.permute(v, a)
        if k == "transpose":
            return v.transpose(*a)
        if k == "torch_transpose":
            return torch.transpose(v, *a)
        if k == "contiguous":
            return v.contiguous()
        param, dim, item = a
        whole = splits.get((op.src, k, param, dim))
        if whole is None:
            p = list(param) if isinstance(param, tuple) else param
            whole = {"chunk": lambda: v.chunk(p, dim), "torch_chunk": lambda: torch.chunk(v, p, dim),
                     "split": lambda: v.split(p, dim), "torch_split": lambda: torch.split(v, p, dim)}[k]()
            splits[(op.src, k, param, dim)] = whole
        return whole[item]


def _functional_pool(op: Pool, v):
    if op.kind == "f_max":
        return F.max_pool2d(v, op.kernel, op.stride, op.padding, ceil_mode=True) if op.ceil else \
            F.max_pool2d(v, op.kernel, op.stride, op.padding)
    if op.kind == "f_avg":
        return F.avg_pool2d(v, op.kernel, op.stride, op.padding)
    if op.kind == "f_gap":
        return F.adaptive_avg_pool2d(v, 1)
    if op.kind == "f_adaptive":
        return F.adaptive_avg_pool2d(v, op.kernel)
    if op.kind == "f_gap1d":
        return F.adaptive_avg_pool1d(v, 1)
    if op.kind == "mean":
        return v.mean((2, 3))
    if op.kind == "mean_keep":
        return v.mean(dim=(-2, -1), keepdim=True)
    return torch.mean(v, (2, 3))


def _size(v, d: int, how: str):
    if how == "shape":
        return v.shape[d]
    if how == "size_all":
        return v.size()[d]
    return v.size(d)


def _token(t, vals: list, how: str):
    if isinstance(t, int):
        return t
    if t[0] == "size":
        return _size(vals[t[1]], t[2], how)
    return _ARITH[t[0]](_token(t[1], vals, how), _token(t[2], vals, how))


def _reshape(op: Reshape, vals: list):
    sizes = [_token(t, vals, op.sizes) for t in op.shape]
    v = vals[op.src]
    return v.view(*sizes) if op.method == "view" else v.reshape(*sizes)


def channel_shuffle(x, op: Shuffle):
    if op.style == "size":
        b, c, h, w = x.size()
    elif op.style == "shape":
        b, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    else:
        b, c, h, w = x.size(0), x.size(1), x.size(2), x.size(3)
    y = x.view(b, op.groups, c // op.groups, h, w)
    y = y.transpose(1, 2) if op.swap == "transpose" else y.permute(0, 2, 1, 3, 4)
    return y.contiguous().view(b, -1, h, w)


def _structure(out: Out, vals: list):
    def item(v):
        return _structure(v, vals) if isinstance(v, Out) else vals[v]
    if out.kind == "dict":
        return {k: item(v) for k, v in out.items}
    items = [item(v) for v in out.items]
    return items if out.kind == "list" else tuple(items)
