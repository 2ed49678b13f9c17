"""Graph rewrites before the quantization surgery (:func:`pyzeroq.modules.prepare`), each exact in
float arithmetic up to rounding (the surgery check of :mod:`pyzeroq.validation` compares the
result with the float model):

* :func:`split_shared_layers`: a Conv / Linear module called more than once (a detection head
  shared across pyramid levels) becomes one copy per call, so that every call has its own input
  and output quantizers and its own folded BatchNorm (a head shared across levels usually has
  one BN per level). The copies share nothing afterwards: the integer model and the ONNX file
  store the weights once per call, and mixed precision counts each copy's weights.
* :func:`fold_constant_scales`: ``layer(x) * c`` with ``c`` a constant (a parameter or buffer
  of the model, scalar or one value per output channel, e.g. FCOS's per-level ``Scale``) is
  folded into the layer's weights and bias when the layer has no other user.
* :func:`canonical_activations`: other spellings of the ops pyzeroq quantizes become the ones it
  knows -- ``x.relu()`` and a clamp to ``[0, inf)`` become ``torch.relu``, a clamp to ``[0, 6]``
  ``F.relu6``, and ``F.dropout(x, p, training=False)`` (dropout traced in eval mode) ``x``. Exact.
"""

from __future__ import annotations

import copy
import numbers
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["split_shared_layers", "fold_constant_scales", "canonical_activations", "SHARED_COPY_SUFFIX"]

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
SCALE_FUNCTIONS = (operator.mul, torch.mul)
CLAMP_FUNCTIONS = (torch.clamp, torch.clip, torch.clamp_min)
CLAMP_METHODS = ("clamp", "clip", "clamp_min")  # the out-of-place ones: an in-place clamp also changes x
DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
RELU6_MAX = 6
SHARED_COPY_SUFFIX = "_call"  # "<module path with _>_call<i>" for the i-th call (i >= 1)


def _layer_node(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                                                 LAYER_TYPES)


def split_shared_layers(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Give every call of a layer module called more than once its own copy (the first call keeps
    the module); returns {module name: [names of the copies]}."""
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if _layer_node(gm, node):
            calls.setdefault(str(node.target), []).append(node)
    copies: dict[str, list[str]] = {}
    for target, nodes in calls.items():
        for i, node in enumerate(nodes[1:], start=1):
            name = f"{target.replace('.', '_')}{SHARED_COPY_SUFFIX}{i}"
            gm.add_module(name, copy.deepcopy(gm.get_submodule(target)))
            node.target = name
            copies.setdefault(target, []).append(name)
    if copies:
        gm.recompile()
    return copies


def _constant(gm: fx.GraphModule, node) -> Optional[torch.Tensor]:
    """The tensor of a ``get_attr`` node (a parameter or buffer) or of a Python number, else None."""
    if isinstance(node, numbers.Real) and not isinstance(node, bool):
        return torch.tensor(float(node))
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    try:
        value = gm.get_parameter(node.target)
    except AttributeError:
        try:
            value = gm.get_buffer(node.target)
        except AttributeError:
            return None
    return value.detach()


def _channel_factor(layer: nn.Module, c: torch.Tensor) -> Optional[torch.Tensor]:
    """``c`` as one factor per output channel [O], or None when it does not broadcast that way."""
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if c.numel() == 1:
        return c.reshape(1).expand(out).clone()
    squeezed = [d for d in c.shape if d != 1]
    channel_dim = -1 if isinstance(layer, nn.Linear) else -(layer.weight.dim() - 1)  # [.., O] / [O, *spatial]
    if squeezed != [out] or c.dim() < -channel_dim or c.shape[channel_dim] != out:
        return None
    return c.reshape(out).clone()


def fold_constant_scales(gm: fx.GraphModule) -> list[str]:
    """Fold ``layer(x) * c`` (``c`` a model constant -- scalar or per output channel -- or a
    Python number) into the layer; returns the names of the folded mul nodes."""
    folded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SCALE_FUNCTIONS or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        src, const = (a, b) if _layer_node(gm, a) else (b, a)
        c = _constant(gm, const)
        if not _layer_node(gm, src) or c is None or len(src.users) != 1:
            continue
        layer = gm.get_submodule(src.target)
        factor = _channel_factor(layer, c)
        if factor is None or not torch.isfinite(factor).all():
            continue
        shape = [1] * layer.weight.dim()
        shape[1 if isinstance(layer, nn.ConvTranspose2d) else 0] = -1  # the output channels' axis
        with torch.no_grad():
            layer.weight.mul_(factor.to(layer.weight).view(shape))
            if layer.bias is not None:
                layer.bias.mul_(factor.to(layer.bias))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        if isinstance(const, fx.Node) and not const.users:
            gm.graph.erase_node(const)
        folded.append(node.name)
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded


def _bounds(node: fx.Node) -> tuple | None:
    """(min, max) of a clamp node (``clamp_min``: max None), or None when it is not a clamp."""
    if not (node.op == "call_function" and node.target in CLAMP_FUNCTIONS
            or node.op == "call_method" and node.target in CLAMP_METHODS):
        return None
    names = ("min",) if node.target in (torch.clamp_min, "clamp_min") else ("min", "max")
    bound = dict(zip(names, node.args[1:])) | dict(node.kwargs)
    return bound.get("min"), bound.get("max")


def _plain_number(v, want) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == want


def _canonical(node: fx.Node):
    """The function that ``node`` computes in the form pyzeroq quantizes, or None."""
    if node.op == "call_method" and node.target == "relu" and len(node.args) == 1 and not node.kwargs:
        return torch.relu
    bounds = _bounds(node)
    if bounds is not None and _plain_number(bounds[0], 0):
        if bounds[1] is None:
            return torch.relu
        if _plain_number(bounds[1], RELU6_MAX):
            return F.relu6
    return None


def _is_eval_dropout(node: fx.Node) -> bool:
    """True for a functional dropout traced with ``training=False``; ValueError for one that drops
    (its ``training`` defaults to True whatever the module's mode: random outputs in eval mode)."""
    if node.op != "call_function" or node.target not in DROPOUT_FUNCTIONS:
        return False
    args = dict(zip(("input", "p", "training", "inplace"), node.args)) | dict(node.kwargs)
    if args.get("training", True) is not False and args.get("p", 0.5) != 0:
        raise ValueError(f"model: {node.target.__name__} ({node.name}) drops at random even in eval mode "
                         "(its training argument defaults to True); pass training=self.training")
    return True


def _input(node: fx.Node):
    """The tensor a unary op reads: its first argument, positional or ``input=``."""
    return node.args[0] if node.args else node.kwargs["input"]


def canonical_activations(gm: fx.GraphModule) -> list[str]:
    """Rewrite the other spellings of ReLU / ReLU6 / eval-mode dropout (module docstring) in place;
    returns the names of the rewritten nodes."""
    changed = []
    for node in list(gm.graph.nodes):
        if _is_eval_dropout(node):
            node.replace_all_uses_with(_input(node))
            gm.graph.erase_node(node)
            changed.append(node.name)
            continue
        target = _canonical(node)
        if target is not None:
            node.op, node.target, node.args, node.kwargs = "call_function", target, (_input(node),), {}
            changed.append(node.name)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
