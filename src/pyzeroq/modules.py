"""Fake-quantized layers and the torch.fx model surgery that inserts them.

Quantization points (one meaning everywhere, chosen so that the integer-only
converter can run the same graph on codes):

* weights of every Conv1d / Conv2d / Linear, per output channel (or per tensor), after the
  BatchNorm1d / 2d that consumes the layer's output has been folded into it;
* every activation tensor produced by a supported op, per tensor: the normalized
  model input, each conv/linear output (after its ReLU/ReLU6 when that is its only
  user — a fused clamp), each residual add and each product of two tensors (squeeze-excite
  gating; after its ReLU when fused), each pooling (modules,
  ``F.max_pool2d`` / ``F.avg_pool2d`` / ``F.adaptive_avg_pool2d`` and the spatial mean
  ``x.mean((2, 3))``: :func:`functional_pool`);
  a Linear whose only user is the graph output (the logits) stays float: the integer model
  dequantizes its accumulator instead of requantizing it; every other tensor the model returns
  (feature maps, a conv head's output, entries of a tuple / dict) is quantized, and
  dequantized at the integer model's output;
* the output of every elementwise activation with an integer lookup table (Hardswish,
  Hardsigmoid, SiLU, GELU, Sigmoid, Tanh, LeakyReLU, Hardtanh: :func:`lookup_op`); its
  input is already quantized (the output of the op before it);
* the output of every ``torch.cat`` (any dim): one scale calibrated on the concatenated tensor,
  the inputs requantized to it (each input keeps the range calibrated upstream; a scale shared
  with the inputs would couple the branches' ranges);
* biases, at the integer scale input_scale x weight_scale[c] (int32 in the integer model).

BatchNorms are found through the graph: a BN is folded into the conv whose output it
consumes when that conv has no other user; any other BatchNorm (pre-activation BN-ReLU-conv,
a BN after a concat or an add, a BatchNorm1d in an MLP) becomes the depthwise 1x1 conv of its
affine map (:func:`bn_as_depthwise_conv`), quantized like every conv. Anything the pass does not understand stays
float and is listed in ``float_ops``.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .layout_ops import is_contiguous, is_shape_node, is_split_source, layout_op
from .qspec import UNSIGNED_ASYMMETRIC, CodeFormat, LayerQuant, TensorQuant
from .quantizers import (  # noqa: F401 (re-exported: the quantizer family lives in quantizers.py)
    ACT_SAMPLE_CAP,
    MSE_CLIP_STEPS,
    QUANT_CONV_TYPES,
    QUANT_LAYER_TYPES,
    ChannelAffine,
    QuantAct,
    QuantChannelAffine,
    QuantConv1d,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantLinear,
    mse_clip_range,
)
from .rewrites import canonical_activations, fold_constant_scales, split_shared_layers

RELU_MODULES = (nn.ReLU, nn.ReLU6)
BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
# the layers a BN reading their output folds into
FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
RELU_FUNCTIONS = (F.relu, torch.relu, F.relu6)
POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool1d)
PASSTHROUGH_FUNCTIONS = (torch.flatten,)
ADD_FUNCTIONS = (operator.add, torch.add, operator.iadd)
MUL_FUNCTIONS = (operator.mul, torch.mul, operator.imul)  # of two tensors (squeeze-excite gating)
# elementwise activations computed by a lookup table on the input codes (integer LookupStep);
# nn.ReLU6 subclasses nn.Hardtanh: the ReLU family is classified first (relu_kind)
LOOKUP_MODULES = (nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.Hardtanh)
LOOKUP_FUNCTIONS = (F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.sigmoid, F.tanh, torch.sigmoid, torch.tanh,
                    F.leaky_relu, F.hardtanh)
LOOKUP_METHODS = ("sigmoid", "tanh")
CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)
# functional pools: their positional parameters after the input, as the nn module takes them
POOL_FUNCTIONS = {
    F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.avg_pool2d: (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                  "divisor_override")),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
    F.adaptive_avg_pool1d: (nn.AdaptiveAvgPool1d, ("output_size",)),
}
SPATIAL_DIMS = (2, 3)  # H, W of [N, C, H, W]
IMAGE_RANK = 4  # negative mean dims are read as dims of an [N, C, H, W] tensor


def fold_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """Conv1d / Conv2d / Linear with the BatchNorm1d / 2d that reads its output folded in:
    w' = w * g / sqrt(var + eps) (per output channel), b' = (b - mean) * g / sqrt(var + eps) + beta."""
    folded = copy.deepcopy(conv)
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = (gamma / std).detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(std)
    with torch.no_grad():
        shape = [1] * conv.weight.dim()
        shape[1 if isinstance(conv, nn.ConvTranspose2d) else 0] = -1  # the output channels' axis
        folded.weight = nn.Parameter(conv.weight.detach() * factor.view(shape))
        folded.bias = nn.Parameter((bias - bn.running_mean) * factor + beta.detach())
    return folded


@dataclass
class SurgeryInfo:
    layers: list[str] = field(default_factory=list)          # quantized conv/linear, graph order
    act_quants: list[str] = field(default_factory=list)      # inserted QuantAct modules
    folded_bn: dict[str, str] = field(default_factory=dict)  # bn name -> conv name
    bn_as_conv: list[str] = field(default_factory=list)      # BNs after no layer: depthwise 1x1 convs
    shared_layers: dict[str, list[str]] = field(default_factory=dict)  # layer called k times -> its k-1 copies
    folded_scales: list[str] = field(default_factory=list)   # `layer(x) * constant` nodes folded into the layer
    float_ops: list[str] = field(default_factory=list)       # ops left in float (not understood)


def _is_module(gm: fx.GraphModule, node: fx.Node, types) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), types)


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _fused_relu(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    if _is_module(gm, user, RELU_MODULES) or (user.op == "call_function" and user.target in RELU_FUNCTIONS):
        return user
    return None


def relu_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """"relu" / "relu6" for a ReLU-family node (module or function), else None."""
    if _is_module(gm, node, (nn.ReLU6,)) or (node.op == "call_function" and node.target is F.relu6):
        return "relu6"
    if _is_module(gm, node, (nn.ReLU,)) or (node.op == "call_function" and node.target in RELU_FUNCTIONS):
        return "relu"
    return None


def lookup_op(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Name of the elementwise activation at ``node`` that has an integer lookup table (module
    class name, function or method name), else None. Extra arguments (negative_slope,
    min_val / max_val, approximate) must be constants."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, LOOKUP_MODULES) and not isinstance(mod, RELU_MODULES):
            return type(mod).__name__
        return None
    if node.op == "call_function" and node.target in LOOKUP_FUNCTIONS or \
            node.op == "call_method" and node.target in LOOKUP_METHODS:
        extra = list(node.args[1:]) + list(node.kwargs.values())
        if node.args and isinstance(node.args[0], fx.Node) and not any(isinstance(a, fx.Node) for a in extra):
            return getattr(node.target, "__name__", str(node.target))
    return None


def functional_pool(node: fx.Node) -> tuple[nn.Module, bool] | None:
    """(the equivalent pooling module, keepdim) of a functional pool or a spatial mean
    (``x.mean((2, 3))``, ``x.mean(dim=(-2, -1), keepdim=True)``, ``torch.mean(x, (2, 3))``: a
    global average pool, ``keepdim=False`` dropping the two unit dims) at ``node``, else None.
    Arguments must be constants."""
    if not node.args or not isinstance(node.args[0], fx.Node) or \
            any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
        return None
    if node.op == "call_function" and node.target in POOL_FUNCTIONS:
        cls, params = POOL_FUNCTIONS[node.target]
        kwargs = dict(zip(params, node.args[1:]), **node.kwargs)
        if set(kwargs) - set(params) or len(node.args) - 1 > len(params):
            return None
        return cls(**kwargs), True
    if node.op == "call_method" and node.target == "mean" or node.op == "call_function" and node.target is torch.mean:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if set(node.kwargs) - {"dim", "keepdim"} or not isinstance(dims, (tuple, list)) or \
                sorted(int(d) % IMAGE_RANK for d in dims) != list(SPATIAL_DIMS):
            return None
        return nn.AdaptiveAvgPool2d(1), bool(keepdim)
    return None


def is_cat(node: fx.Node) -> bool:
    """A ``torch.cat`` of a list of tensors (nodes) along a constant dim."""
    if node.op != "call_function" or node.target not in CAT_FUNCTIONS or not node.args:
        return False
    tensors, rest = node.args[0], list(node.args[1:]) + list(node.kwargs.values())
    return isinstance(tensors, (list, tuple)) and len(tensors) > 0 and \
        all(isinstance(t, fx.Node) for t in tensors) and not any(isinstance(a, fx.Node) for a in rest)


def _own_tensor(module: nn.Module, name: str):
    """``module.<name>`` read from its stores, not by ``getattr``: while fx traces, ``getattr`` of a
    parameter returns a proxy (a normalizer with ``nn.Parameter`` mean / std was then inlined)."""
    for store in (module._parameters, module._buffers, module.__dict__):
        if name in store:
            return store[name]
    return None


def _is_normalizer(module: nn.Module) -> bool:
    return isinstance(_own_tensor(module, "mean"), torch.Tensor) and \
        isinstance(_own_tensor(module, "std"), torch.Tensor)


is_normalizer = _is_normalizer  # public: an input normalization module ((x - mean) / std, tensor mean and std)


class _Tracer(fx.Tracer):
    """Keeps input-normalization modules whole (one quantization point after them)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_normalizer(m) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.GraphModule(model, _Tracer().trace(model))
    except Exception as exc:  # tracing errors come in many types
        raise ValueError(f"model could not be traced by torch.fx ({type(exc).__name__}: {exc}); "
                         "pyzeroq needs a symbolically traceable model") from exc


def _fold_bns(gm: fx.GraphModule, info: SurgeryInfo) -> None:
    """Step 1: fold each BN into the conv it consumes (when the conv has no other user)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if not _is_module(gm, node, BN_MODULES):
            continue
        src = node.args[0]
        if isinstance(src, fx.Node) and _is_module(gm, src, FOLDABLE_LAYERS) and len(src.users) == 1 and \
                _out_channels(gm.get_submodule(src.target)) == gm.get_submodule(node.target).num_features:
            _set_submodule(gm, src.target, fold_bn(gm.get_submodule(src.target), gm.get_submodule(node.target)))
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            info.folded_bn[node.target] = src.target
        else:  # e.g. pre-activation BN-ReLU-conv, a BN after a concat, a BatchNorm1d in an MLP
            _set_submodule(gm, node.target, bn_as_depthwise_conv(gm.get_submodule(node.target)))
            info.bn_as_conv.append(node.target)


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def bn_as_depthwise_conv(bn: nn.Module) -> nn.Module:
    """A BatchNorm2d (eval) as the depthwise 1x1 Conv2d computing the same per-channel affine map
    ``y = x * g / sqrt(var + eps) + (beta - mean * g / sqrt(var + eps))``, a BatchNorm1d as the
    same map on [N, C, ...] of any rank (:class:`pyzeroq.quantizers.ChannelAffine`); quantized as
    a layer (one weight per channel: exact at any bit width, its single value being a range end)."""
    cls = nn.Conv2d if isinstance(bn, nn.BatchNorm2d) else ChannelAffine
    conv = cls(bn.num_features, bn.num_features, 1, groups=bn.num_features, bias=True,
               device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    identity = cls(bn.num_features, bn.num_features, 1, groups=bn.num_features, bias=False,
                   device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    with torch.no_grad():
        identity.weight.fill_(1.0)
    folded = fold_bn(identity, bn)
    conv.load_state_dict(folded.state_dict())
    return conv


def _swap_layers(gm: fx.GraphModule, info: SurgeryInfo, per_channel: bool, weight_format: CodeFormat) -> None:
    """Step 2: conv / linear -> their quantized versions (one module per call: shared ones were
    split by :func:`pyzeroq.rewrites.split_shared_layers`)."""
    for node in gm.graph.nodes:
        cls = _quant_class(gm.get_submodule(node.target)) if node.op == "call_module" else None
        if cls is not None:
            _set_submodule(gm, node.target, cls.from_float(gm.get_submodule(node.target), per_channel,
                                                          weight_format=weight_format))
            info.layers.append(node.target)


# float layer type -> its quantized form; checked in order (ChannelAffine is a Conv1d)
QUANT_CLASSES = ((nn.Conv2d, QuantConv2d), (ChannelAffine, QuantChannelAffine), (nn.Conv1d, QuantConv1d),
                 (nn.ConvTranspose2d, QuantConvTranspose2d), (nn.Linear, QuantLinear))


def _quant_class(mod: nn.Module):
    """The quantized class of a float layer, or None (not a layer, or a form without one: a grouped
    or non-zero-padded ConvTranspose2d stays float and is listed)."""
    for float_cls, quant_cls in QUANT_CLASSES:
        if isinstance(mod, float_cls):
            return quant_cls if getattr(quant_cls, "supports", lambda m: True)(mod) else None
    return None


def _activation_points(gm: fx.GraphModule, info: SurgeryInfo) -> tuple[list, dict]:
    """Step 3: the nodes whose outputs get a QuantAct, and {point: (quantized layer, fused clamp)};
    ops not understood are listed in ``info.float_ops``."""
    points: list[fx.Node] = []
    layer_points: dict[fx.Node, tuple] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if not any(u.op == "call_module" and _is_normalizer(gm.get_submodule(u.target)) for u in node.users):
                points.append(node)
        elif keeps_quantization(gm, node):
            continue  # data movement / sizes: the codes keep their record
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if _is_normalizer(mod) or isinstance(mod, POOL_MODULES) or lookup_op(gm, node) is not None:
                points.append(node)
            elif isinstance(mod, QUANT_LAYER_TYPES):
                relu = _fused_relu(gm, node)
                points.append(relu or node)
                layer_points[relu or node] = (mod, relu_kind(gm, relu) if relu is not None else None)
            elif not isinstance(mod, RELU_MODULES + (nn.Identity, nn.Dropout, nn.Flatten)):
                info.float_ops.append(f"{node.target} ({type(mod).__name__})")  # clamps / passthroughs are fine
        elif lookup_op(gm, node) is not None or is_cat(node) or functional_pool(node) is not None:
            points.append(node)
        elif node.op == "call_function":
            if node.target in ADD_FUNCTIONS + MUL_FUNCTIONS and all(isinstance(a, fx.Node) for a in node.args[:2]):
                points.append(_fused_relu(gm, node) or node)
            elif node.target not in PASSTHROUGH_FUNCTIONS and node.target not in RELU_FUNCTIONS:
                info.float_ops.append(f"{node.name} ({getattr(node.target, '__name__', node.target)})")
        elif node.op == "call_method" and node.target not in ("view", "reshape", "flatten", "size"):
            info.float_ops.append(f"{node.name} (.{node.target})")
    return points, layer_points


def _is_logits(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A Linear (no fused clamp) whose only user is the graph output (not one nobody reads): its float output is the
    dequantized int32 accumulator. Every other tensor the model returns is quantized (and
    dequantized at the output)."""
    return _is_module(gm, node, (QuantLinear,)) and bool(node.users) and all(u.op == "output" for u in node.users)


def _new_act_quant(gm: fx.GraphModule, node: fx.Node, act_bits, percentile, act_range, act_format) -> QuantAct:
    quant = QuantAct(act_bits, percentile, act_range, act_format)
    if node.op == "call_module" and _is_normalizer(gm.get_submodule(node.target)):
        # models take images in [0, 1]: the normalized range is known exactly, so the
        # input quantizer does not depend on the (unbounded) calibration images
        norm = gm.get_submodule(node.target)
        lo, hi = (0.0 - norm.mean) / norm.std, (1.0 - norm.mean) / norm.std
        quant.fixed_range = (float(torch.minimum(lo, hi).min()), float(torch.maximum(lo, hi).max()))
    return quant


def _insert_act_quants(gm: fx.GraphModule, info: SurgeryInfo, points: list, layer_points: dict,
                       act_bits, percentile, act_range, act_format: CodeFormat) -> None:
    """Step 3b: a QuantAct after every point (not the logits); layers learn their output quantizer."""
    graph = gm.graph
    inserted: dict[fx.Node, QuantAct] = {}
    for i, node in enumerate(points):
        if _is_logits(gm, node):
            continue  # logits stay float (dequantized accumulator)
        name = f"act_quant_{i}"
        quant = _new_act_quant(gm, node, act_bits, percentile, act_range, act_format)
        gm.add_module(name, quant)
        with graph.inserting_after(node):
            q = graph.call_module(name, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
        info.act_quants.append(name)
        inserted[node] = quant
        if node in layer_points:  # the layer's output record and fused clamp
            layer, activation = layer_points[node]
            object.__setattr__(layer, "output_quant", quant)
            layer.activation = activation
    # a pooled tensor lies within its input's range: same scale and zero point (no calibration
    # of its own, which on distilled data can clip the features the classifier reads)
    for node, quant in inserted.items():
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), POOL_MODULES) or \
                node.op != "call_module" and functional_pool(node) is not None:
            src = node.args[0]
            if isinstance(src, fx.Node) and src.op == "call_module" and \
                    isinstance(gm.get_submodule(src.target), QuantAct):
                object.__setattr__(quant, "same_as", gm.get_submodule(src.target))


KEEPS_QUANTIZATION_MODULES = RELU_MODULES + (nn.Identity, nn.Dropout, nn.Flatten)
KEEPS_QUANTIZATION_METHODS = ("view", "reshape", "flatten")


def keeps_quantization(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A layout op (permute, transpose, an item of chunk / split, nearest upsample; the chunk /
    split itself), ``contiguous`` or size arithmetic (:mod:`pyzeroq.layout_ops`)."""
    return is_shape_node(node) or is_split_source(node) or is_contiguous(node) or layout_op(gm, node) is not None


def _quantized_source(gm: fx.GraphModule, node: fx.Node) -> QuantAct | None:
    """The QuantAct whose codes reach ``node``'s data input (:func:`quantized_source_of` of its
    first argument)."""
    return quantized_source_of(gm, node.args[0] if node.args else None)


def quantized_source_of(gm: fx.GraphModule, src) -> QuantAct | None:
    """The QuantAct whose codes reach the value ``src`` through ops that keep the quantization
    (reshapes such as ``x.view(x.size(0), -1)``, Identity / Dropout / Flatten, ReLU clamps, layout
    ops: exact on the codes); None when it is a float tensor."""
    while isinstance(src, fx.Node):
        if src.op == "call_module":
            mod = gm.get_submodule(src.target)
            if isinstance(mod, QuantAct):
                return mod
            if not isinstance(mod, KEEPS_QUANTIZATION_MODULES) and not keeps_quantization(gm, src):
                return None
        elif not (src.op == "call_method" and src.target in KEEPS_QUANTIZATION_METHODS or
                  src.op == "call_function" and src.target in PASSTHROUGH_FUNCTIONS + RELU_FUNCTIONS or
                  keeps_quantization(gm, src)):
            return None
        src = src.args[0] if src.args else None
    return None


def _link_inputs(gm: fx.GraphModule, info: SurgeryInfo) -> None:
    """Step 4: tell each quantized layer which quantizer feeds it (for the bias record); a layer
    whose input is float is listed in ``info.float_ops``."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), QUANT_LAYER_TYPES):
            source = _quantized_source(gm, node)
            if source is None:
                info.float_ops.append(f"{node.target} (reads a float input)")
                continue
            # plain attribute, not a registered submodule (would duplicate it in state_dict)
            object.__setattr__(gm.get_submodule(node.target), "input_quant", source)


def prepare(model: nn.Module, act_bits: int | None = 8, per_channel: bool = True,
            percentile: float | None = None, act_range: str = "minmax", *,
            weight_format: CodeFormat = UNSIGNED_ASYMMETRIC,
            act_format: CodeFormat = UNSIGNED_ASYMMETRIC) -> tuple[fx.GraphModule, SurgeryInfo]:
    """Trace a copy of ``model`` (eval mode), fold BNs, insert quantized layers and QuantActs
    (weights in ``weight_format``, activations in ``act_format``: :class:`pyzeroq.qspec.CodeFormat`).

    Raises ValueError when the model cannot be traced by torch.fx."""
    gm = _trace(copy.deepcopy(model).eval())
    info = SurgeryInfo()
    canonical_activations(gm)
    info.shared_layers = split_shared_layers(gm)
    info.folded_scales = fold_constant_scales(gm)
    _fold_bns(gm, info)
    _swap_layers(gm, info, per_channel, weight_format)
    points, layer_points = _activation_points(gm, info)
    _insert_act_quants(gm, info, points, layer_points, act_bits, percentile, act_range, act_format)
    _link_inputs(gm, info)
    gm.graph.lint()
    gm.delete_all_unused_submodules()  # the folded BNs
    gm.recompile()
    return gm, info


def layer_records(gm: nn.Module) -> dict[str, LayerQuant]:
    """{layer name: :class:`LayerQuant`} of every quantized conv / linear of a calibrated model."""
    return {name: layer.layer_record(name) for name, layer in quant_layers(gm).items()}


def activation_records(gm: nn.Module) -> dict[str, TensorQuant]:
    """{quantizer name: :class:`TensorQuant`} of every quantizing activation quantizer."""
    return {name: q.record() for name, q in act_quants(gm).items() if q.mode == "quantize"}


def fit_bias_scales(gm: nn.Module, on_overflow: str = "enlarge") -> list[dict]:
    """Fit the weight scales of every quantized layer of a calibrated model so that its int32
    bias is exact and fits int32 (:mod:`pyzeroq.bias`: degenerate channels rescaled, overflowing
    ones enlarged, or an error / a clip warning by ``on_overflow``); returns the adjustments.

    Run it after activation calibration (the bias step needs the input scale) and again after
    changing weight bits (:func:`set_weight_bits` recalibrates the weight scales). Every layer
    is checked before any is changed, so "error" leaves the model as it was.
    """
    fitted, adjustments = [], []
    for name, layer in quant_layers(gm).items():
        record, found = layer.fit_bias_scale(name, on_overflow)
        adjustments += found
        if record is not None:
            fitted.append((layer, record))
    for layer, record in fitted:
        layer.weight_quant.set_record(record)
    return adjustments


def quant_layers(gm: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}


def act_quants(gm: nn.Module) -> dict[str, QuantAct]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, QuantAct)}


def set_act_mode(gm: nn.Module, mode: str) -> None:
    if mode not in ("off", "observe", "quantize"):
        raise ValueError(f"mode must be 'off', 'observe' or 'quantize', got {mode!r}")
    for q in act_quants(gm).values():
        if mode == "observe":
            q.reset()
        q.mode = mode if (mode != "quantize" or q.bits is not None) else "off"


def set_weight_bits(gm: nn.Module, bits: dict[str, int | None] | int | None) -> None:
    for name, layer in quant_layers(gm).items():
        layer.set_weight_bits(bits.get(name) if isinstance(bits, dict) else bits)
