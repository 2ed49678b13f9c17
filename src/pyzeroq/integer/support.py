"""What the integer path can run, decided on the prepared graph before any calibration.

:func:`pyzeroq.quantize` stops before its costly stages on an op that :func:`pyzeroq.to_integer`
would refuse, or whose integer model would fail at run time (``QuantConfig.float_ops``). The
module limits (:func:`module_blocker`) are the ones the integer plan itself applies; the shape
limits (:func:`integer_blockers`) come from one shape-propagating forward of the prepared graph.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from ..layout_ops import layout_op
from ..modules import ADD_FUNCTIONS, QUANT_CONV_TYPES, functional_pool

__all__ = ["module_blocker", "integer_blockers", "int_pair"]

IMAGE_RANK = 4  # [N, C, H, W]: the rank of the simulator's pooling and nearest-upsampling kernels


def int_pair(v) -> tuple:
    """(h, w) ints of a module's int-or-pair argument (kernel_size, stride, padding, ...)."""
    return tuple(int(e) for e in v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def module_blocker(m: nn.Module) -> Optional[str]:
    """Why the integer plan cannot run the module ``m`` (a quantized conv or a pooling module;
    None: it can, or it is not one of those)."""
    if isinstance(m, QUANT_CONV_TYPES) and m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} is not supported (zero padding only)"
    if isinstance(m, nn.MaxPool2d) and (int_pair(m.dilation) != (1, 1) or m.return_indices):
        return "MaxPool2d with dilation or return_indices is not supported"
    if isinstance(m, nn.AvgPool2d) and (m.ceil_mode or m.divisor_override is not None
                                        or (any(int_pair(m.padding)) and not m.count_include_pad)):
        return "AvgPool2d with ceil_mode, divisor_override or padding without count_include_pad is not supported"
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        raw = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size,)
        if None in raw or (isinstance(m, nn.AdaptiveAvgPool1d) and tuple(raw) != (1,)):
            return (f"{type(m).__name__}({m.output_size}) is not supported (AdaptiveAvgPool1d: output size 1; "
                    "AdaptiveAvgPool2d: sizes that divide the input)")
    return None


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and keeps the shape of every tensor a node produced ({node: shape}):
    torch.fx's ShapeProp without its records in the graph (and without its import of sympy,
    ~0.2 s)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


def _shape_blocker(gm: fx.GraphModule, node: fx.Node, m: Optional[nn.Module], shapes: dict) -> Optional[str]:
    """The limits that need the shapes (``shapes``: {node: shape}): adds without broadcasting,
    adaptive pools whose output size divides the input, nearest upsampling of images."""
    def _shape(v) -> Optional[tuple]:
        return shapes.get(v) if isinstance(v, fx.Node) else None

    if node.op == "call_function" and node.target in ADD_FUNCTIONS and len(node.args) == 2 \
            and all(isinstance(a, fx.Node) for a in node.args):  # (muls broadcast: squeeze-excite gating)
        a, b = (_shape(v) for v in node.args)
        if a is not None and b is not None and a != b:
            return f"an add of tensors of different shapes {a} and {b} (broadcasting) is not supported"
    if isinstance(m, nn.AdaptiveAvgPool2d):  # the module's output size: a spatial mean's node drops the dims
        size, out = _shape(node.args[0]), int_pair(m.output_size)
        if size is not None and len(size) >= 2 and any(o and s % o for s, o in zip(size[-2:], out)):
            return (f"AdaptiveAvgPool2d to {out} of a {size[-2]} x {size[-1]} input is not supported "
                    "(the output size must divide the input)")
    op = layout_op(gm, node)
    if op is not None and op[0] == "upsample" and len(_shape(node.args[0]) or (IMAGE_RANK,)) != IMAGE_RANK:
        return f"nearest upsampling of a {len(_shape(node.args[0]))}-D tensor is not supported (images [N, C, H, W] only)"
    return None


@torch.no_grad()
def integer_blockers(gm: fx.GraphModule, sample: torch.Tensor) -> list[str]:
    """The nodes of the prepared graph ``gm`` that the integer path cannot run, as
    ``"name (op): reason"``; ``sample``: an input batch of the model's shape (its values do not
    matter; activation quantization should be off)."""
    recorder = _ShapeRecorder(gm)
    try:
        recorder.run(sample)
    except Exception:  # noqa: BLE001 -- the shape limits are then left to to_integer (the dry forward passed)
        pass
    modules = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        m = modules.get(node.target) if node.op == "call_module" else None
        if m is None and node.op != "call_module":
            pool = functional_pool(node)
            m = pool[0] if pool is not None else None
        reason = (module_blocker(m) if m is not None else None) or _shape_blocker(gm, node, m, recorder.shapes)
        if reason is not None:
            op = type(m).__name__ if node.op == "call_module" else getattr(node.target, "__name__", node.target)
            found.append(f"{node.name} ({op}): {reason}")
    return found
