"""Data-movement ops on quantized tensors, and the shape arithmetic that feeds them.

Layout ops move codes without changing them, so the tensor keeps its quantization record
(scale, zero point): no QuantAct after them, exact in the integer model and in ONNX.

==========================================  ==================================================
graph node                                  :func:`layout_op` -> (op, args)
==========================================  ==================================================
``x.permute(*dims)``, ``torch.permute``     ("permute", dims)
``x.transpose(a, b)``, ``torch.transpose``  ("transpose", (a, b))
``x.chunk(n, dim)`` -> ``[i]``              ("chunk", (dim, n, i))   (``torch.chunk`` too)
``x.split(s, dim)`` -> ``[i]``              ("split", (dim, s, i))   s: an int or a list of sizes
``nn.Upsample`` / ``F.interpolate``         ("upsample", (fh, fw))  nearest, integer scale factors
``nn.ZeroPad2d`` / ``F.pad`` (constant 0)  ("pad", torch's pad tuple (left, right, top, bottom, ...)):
                                            the zero point fills (0.0 is exactly that code)
``x.contiguous()``                          an alias (no data movement on numpy codes)
==========================================  ==================================================

Shape arithmetic (``x.size()``, ``x.size(d)``, ``x.shape``, indexing them, ``// * + -`` on the
results) is evaluated by the integer model at run time through :func:`shape_expr`, so a
``view(b, g, c // g, h, w)`` works for any input size.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["layout_op", "is_contiguous", "is_shape_node", "shape_expr", "eval_shape_expr", "slice_bounds",
           "apply_layout", "is_split_source", "LAYOUT_OPS", "SHAPE_ARITHMETIC"]

SHAPE_ARITHMETIC = {operator.floordiv: "floordiv", operator.mul: "mul", operator.add: "add", operator.sub: "sub"}
SPLIT_METHODS = ("chunk", "split")
SPLIT_FUNCTIONS = {torch.chunk: "chunk", torch.split: "split"}
NEAREST = "nearest"
LAYOUT_OPS = ("permute", "transpose", "chunk", "split", "upsample", "pad")


def _const(v) -> bool:
    return not isinstance(v, fx.Node) and not (isinstance(v, (list, tuple)) and any(isinstance(e, fx.Node) for e in v))


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _split_node(node: fx.Node) -> Optional[tuple]:
    """("chunk" | "split", dim, n or sizes) of a ``chunk`` / ``split`` node with constant arguments."""
    kind = node.target if node.op == "call_method" and node.target in SPLIT_METHODS else \
        SPLIT_FUNCTIONS.get(node.target) if node.op == "call_function" else None
    if kind is None:
        return None
    param, dim = _arg(node, 1, "chunks" if kind == "chunk" else "split_size_or_sections"), _arg(node, 2, "dim", 0)
    if kind == "split" and param is None:
        param = node.kwargs.get("split_size")
    if param is None or not _const(param) or not _const(dim):
        return None
    return kind, int(dim), tuple(int(p) for p in param) if isinstance(param, (list, tuple)) else int(param)


def _upsample(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple]:
    """(fh, fw) of a nearest upsample by integer factors (``nn.Upsample`` / ``F.interpolate``)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) is not nn.Upsample:
            return None
        mode, size, factor = mod.mode, mod.size, mod.scale_factor
    elif node.op == "call_function" and node.target is F.interpolate:
        if not all(_const(v) for v in list(node.args[1:]) + list(node.kwargs.values())):
            return None
        mode, size, factor = _arg(node, 3, "mode", NEAREST), _arg(node, 1, "size"), _arg(node, 2, "scale_factor")
    else:
        return None
    factors = factor if isinstance(factor, (list, tuple)) else (factor, factor)
    if mode != NEAREST or size is not None or factor is None or len(factors) != 2 or \
            any(float(f) != int(f) or int(f) < 1 for f in factors):
        return None
    return int(factors[0]), int(factors[1])


def _zero_pad(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple]:
    """torch's pad tuple of a zero padding (``nn.ZeroPad2d``, ``nn.ConstantPad2d(p, 0)``,
    ``F.pad(x, p)`` with mode "constant" and value 0), non-negative; else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad2d)) or float(mod.value) != 0.0:
            return None
        pads = mod.padding
    elif node.op == "call_function" and node.target is F.pad:
        if not all(_const(v) for v in list(node.args[1:]) + list(node.kwargs.values())):
            return None
        pads, mode, value = _arg(node, 1, "pad"), _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
        if mode != "constant" or value not in (None, 0, 0.0):
            return None
    else:
        return None
    pads = tuple(int(p) for p in pads)
    return pads if pads and len(pads) % 2 == 0 and min(pads) >= 0 else None


def layout_op(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple]:
    """(op, args) of a layout node (module docstring), else None."""
    up = _upsample(gm, node)
    if up is not None:
        return "upsample", up
    pads = _zero_pad(gm, node)
    if pads is not None:
        return "pad", pads
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        split = _split_node(node.args[0])
        if split is not None and isinstance(node.args[1], int):
            kind, dim, param = split
            return kind, (dim, param, int(node.args[1]))
        return None
    method = node.target if node.op == "call_method" else \
        {torch.permute: "permute", torch.transpose: "transpose"}.get(node.target) if node.op == "call_function" else None
    rest = list(node.args[1:])
    if method not in ("permute", "transpose") or not rest or not all(_const(v) for v in rest) or node.kwargs:
        return None
    dims = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else tuple(rest)
    if method == "transpose" and len(dims) != 2:
        return None
    return method, tuple(int(d) for d in dims)


def is_contiguous(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "contiguous" and len(node.args) == 1


def is_split_source(node: fx.Node) -> bool:
    """A chunk / split node (its items are taken by getitem layout nodes)."""
    return _split_node(node) is not None


def is_shape_node(node: Any) -> bool:
    """``x.size()`` / ``x.size(d)`` / ``x.shape``, an index into one, or ``// * + -`` of such values."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return True
    if node.op == "call_function" and node.target is operator.getitem:
        return is_shape_node(node.args[0]) and isinstance(node.args[1], int)
    if node.op == "call_function" and node.target in SHAPE_ARITHMETIC:
        return any(is_shape_node(a) for a in node.args) and all(is_shape_node(a) or isinstance(a, int)
                                                                for a in node.args)
    return False


def shape_expr(v: Any, source_index) -> Any:
    """A reshape argument as plain data: an int, or ("size", k, dim) (``dim`` of the tensor in
    the step's ``inputs[k]``; ``source_index(node)`` gives k for the sized tensor), or
    (op, a, b) with op in "floordiv" / "mul" / "add" / "sub". ValueError for anything else."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if not is_shape_node(v):
        raise ValueError(f"shape argument {v!r} is not an int or an arithmetic of tensor sizes")
    if v.op == "call_method":  # x.size(d)
        if len(v.args) != 2 or not isinstance(v.args[1], int):
            raise ValueError(f"{v.name}: x.size() must be indexed (or called with a dim) to give a dimension")
        return ("size", source_index(v.args[0]), int(v.args[1]))
    if v.target is operator.getitem:
        sized = v.args[0]
        if sized.op == "call_function" and sized.target is operator.getitem:
            raise ValueError(f"{v.name}: nested indexing of a size")
        return ("size", source_index(sized.args[0]), int(v.args[1]))
    if v.target is getattr:
        raise ValueError(f"{v.name}: x.shape must be indexed to give a dimension")
    a, b = v.args
    return (SHAPE_ARITHMETIC[v.target], shape_expr(a, source_index), shape_expr(b, source_index))


def eval_shape_expr(e: Any, shapes: list) -> int:
    """Value of a :func:`shape_expr` given the shapes of the step's inputs."""
    if isinstance(e, int):
        return e
    if e[0] == "size":
        return int(shapes[e[1]][e[2]])
    a, b = eval_shape_expr(e[1], shapes), eval_shape_expr(e[2], shapes)
    return {"floordiv": operator.floordiv, "mul": operator.mul, "add": operator.add, "sub": operator.sub}[e[0]](a, b)


def slice_bounds(op: str, args: tuple, size: int) -> tuple[int, int]:
    """[start, stop) of item ``i`` of ``torch.chunk(x, n, dim)`` / ``torch.split(x, s, dim)``
    along a dim of ``size`` elements (torch's rules: chunks of ceil(size / n); split pieces of
    s, or the listed sizes)."""
    _, param, i = args
    if op == "chunk":
        step = -(-size // param)
        starts = list(range(0, size, step))
    elif isinstance(param, int):
        step = param
        starts = list(range(0, size, step))
    else:
        starts = [sum(param[:k]) for k in range(len(param))]
        return starts[i], starts[i] + param[i]
    return starts[i], min(starts[i] + step, size)


def apply_layout(op: str, args: tuple, x, fill: int = 0):
    """The layout op on a numpy array of codes (``fill``: the zero point, for "pad")."""
    if op == "pad":  # torch order: last dim first, (before, after) each
        widths = [(0, 0)] * x.ndim
        for i in range(len(args) // 2):
            widths[x.ndim - 1 - i] = (args[2 * i], args[2 * i + 1])
        return np.pad(x, widths, constant_values=fill)
    if op == "permute":
        return np.ascontiguousarray(np.transpose(x, [d % x.ndim for d in args]))
    if op == "transpose":
        return np.ascontiguousarray(np.swapaxes(x, *args))
    if op == "upsample":
        return np.ascontiguousarray(x.repeat(args[0], axis=-2).repeat(args[1], axis=-1))
    dim = args[0] % x.ndim
    start, stop = slice_bounds(op, args, x.shape[dim])
    index = [slice(None)] * x.ndim
    index[dim] = slice(start, stop)
    return np.ascontiguousarray(x[tuple(index)])
