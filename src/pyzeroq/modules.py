"""Fake-quantized layers and the torch.fx model surgery that inserts them.

Quantization points (one meaning everywhere, chosen so that the integer-only
converter can run the same graph on codes):

* weights of every Conv2d / Linear, per output channel (or per tensor), after the
  BatchNorm that consumes the conv's output has been folded into it;
* every activation tensor produced by a supported op, per tensor: the normalized
  model input, each conv/linear output (after its ReLU/ReLU6 when that is its only
  user — a fused clamp), each residual add (after its ReLU when fused), each pooling;
  the graph output (the logits) stays float: the integer model dequantizes the final
  accumulator instead of requantizing it;
* biases, at the integer scale input_scale x weight_scale[c] (int32 in the integer model).

BatchNorms are found through the graph: a BN is folded into the conv whose output it
consumes when that conv has no other user. Anything the pass does not understand stays
float and is listed in ``float_ops``.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import ACT_RANGES

BIAS_BITS = 32
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
RELU_MODULES = (nn.ReLU, nn.ReLU6)
RELU_FUNCTIONS = (F.relu, torch.relu, F.relu6)
POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d)
PASSTHROUGH_FUNCTIONS = (torch.flatten,)
ADD_FUNCTIONS = (operator.add, torch.add, operator.iadd)
ACT_SAMPLE_CAP = 1 << 22  # values kept per quantizer for percentile / MSE calibration
MSE_CLIP_STEPS = 100  # the MSE range search tries [a * min, a * max] for a = k / MSE_CLIP_STEPS


def mse_clip_range(values: np.ndarray, bits: int) -> tuple[float, float]:
    """The clipping range ``[a * min, a * max]`` (``a = k / MSE_CLIP_STEPS``, k = 1..steps)
    whose ``bits``-bit asymmetric fake quantization of ``values`` has the least squared
    error (sum over values, in float64); ties go to the widest range. ``min <= 0 <= max``
    as in :func:`pyzeroq.ops.asymmetric_params`."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if values.size == 0:
        raise ValueError("mse_clip_range: no activation values to calibrate on")
    if not np.isfinite(values).all():
        raise ValueError("mse_clip_range: the calibration activations contain NaN or Inf")
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    out = np.empty_like(values)
    best, best_err = (lo, hi), np.inf
    for k in range(MSE_CLIP_STEPS, 0, -1):  # widest first: strict "<" keeps it on ties
        a = k / MSE_CLIP_STEPS
        rng = np.array([a * lo, a * hi], dtype=np.float32)
        scale, zp = ops.asymmetric_params(rng, bits)
        ops.fake_quantize(values, scale, zp, bits, out=out)
        err = float(np.square(out.astype(np.float64) - values).sum())
        if err < best_err:
            best, best_err = (float(rng[0]), float(rng[1])), err
    return best


class QuantAct(nn.Module):
    """Per-tensor asymmetric activation fake quantizer.

    ``mode``: "off" (identity), "observe" (identity, records the range of what it sees),
    "quantize" (fake-quantizes with the frozen ``scale`` / ``zero_point``).
    """

    def __init__(self, bits: int | None = 8, percentile: float | None = None, act_range: str = "minmax"):
        super().__init__()
        if act_range not in ACT_RANGES:
            raise ValueError(f"act_range must be one of {ACT_RANGES}, got {act_range!r}")
        self.bits = bits
        self.percentile = percentile
        self.act_range = act_range
        self.mode = "off"
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int64))
        self._min = None
        self._max = None
        self._samples: list[torch.Tensor] = []
        self._sampled = 0
        # a range known without calibration (the normalized image of [0, 1] pixels)
        self.fixed_range: tuple[float, float] | None = None
        # pooling keeps its input's range: reuse that quantizer's params (set by the surgery)
        self.same_as = None  # QuantAct or None; a plain attribute, not a submodule

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}, scale={float(self.scale):.6g}, zero_point={int(self.zero_point)}"

    def reset(self) -> None:
        self._min = self._max = None
        self._samples, self._sampled = [], 0

    def _observe(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1).cpu()
        lo, hi = flat.min(), flat.max()
        self._min = lo if self._min is None else torch.minimum(self._min, lo)
        self._max = hi if self._max is None else torch.maximum(self._max, hi)
        if (self.percentile is not None or self.act_range == "mse") and self._sampled < ACT_SAMPLE_CAP:
            self._samples.append(flat[:ACT_SAMPLE_CAP - self._sampled].clone())
            self._sampled += len(self._samples[-1])

    def freeze(self) -> None:
        """Compute scale / zero point from what was observed and switch to "quantize"."""
        if self._min is None:
            raise RuntimeError("QuantAct.freeze() called before any calibration data was observed")
        if self.bits is None:
            self.mode = "off"
            return
        if self.same_as is not None:
            if self.same_as.mode != "quantize":
                self.same_as.freeze()
            self.scale.copy_(self.same_as.scale)
            self.zero_point.copy_(self.same_as.zero_point)
            self.reset()
            self.mode = "quantize"
            return
        if self.fixed_range is not None:
            values = np.asarray(self.fixed_range, dtype=np.float32)
        elif self.percentile is not None:
            values = torch.cat(self._samples).numpy()
        elif self.act_range == "mse":
            values = np.asarray(mse_clip_range(torch.cat(self._samples).numpy(), self.bits), dtype=np.float32)
        else:
            values = torch.stack([self._min, self._max]).numpy()
        scale, zp = ops.asymmetric_params(values, self.bits, percentile=self.percentile)
        self.scale.fill_(float(scale))
        self.zero_point.fill_(int(zp))
        self.reset()
        self.mode = "quantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            self._observe(x)
            return x
        return ops.fake_quantize_ste(x, float(self.scale), int(self.zero_point), self.bits)


class _QuantWeightMixin:
    """Weight fake quantization with a cache (weights are constant after PTQ)."""

    def _init_quant(self, per_channel: bool):
        self.per_channel = per_channel
        self.weight_bits: int | None = None
        self.input_quant: QuantAct | None = None  # set by the surgery: quantizer of our input
        self._cache = None

    def set_weight_bits(self, bits: int | None) -> None:
        self.weight_bits = bits
        self._cache = None

    def weight_params(self, bits: int):
        w = self.weight.detach().cpu().numpy()
        return ops.asymmetric_params(w, bits, axis=0 if self.per_channel else None)

    def quantized_weight(self) -> torch.Tensor:
        if self.weight_bits is None:
            return self.weight
        key = (self.weight_bits, self.weight._version)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                scale, zp = self.weight_params(self.weight_bits)
                axis = 0 if self.per_channel else None
                qw = ops.fake_quantize(self.weight.detach().cpu().contiguous(), scale, zp, self.weight_bits, axis=axis)
            self._cache = (key, qw.to(self.weight.device), scale)
        return self._cache[1]

    def quantized_bias(self) -> torch.Tensor | None:
        """Bias rounded to int32 at scale input_scale * weight_scale[c] when both are quantized."""
        if self.bias is None or self.weight_bits is None or self.input_quant is None \
                or self.input_quant.mode != "quantize":
            return self.bias
        self.quantized_weight()
        w_scale = torch.as_tensor(self._cache[2], dtype=torch.float32).reshape(-1)
        bias_scale = (self.input_quant.scale.float().cpu() * w_scale).to(self.bias.device)
        codes = torch.clamp(torch.round(self.bias.detach() / bias_scale), INT32_MIN, INT32_MAX)
        return codes * bias_scale


class QuantConv2d(nn.Conv2d, _QuantWeightMixin):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, per_channel: bool = True) -> "QuantConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode)
        q.load_state_dict(conv.state_dict())
        q._init_quant(per_channel)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.quantized_bias())


class QuantLinear(nn.Linear, _QuantWeightMixin):
    @classmethod
    def from_float(cls, linear: nn.Linear, per_channel: bool = True) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q.load_state_dict(linear.state_dict())
        q._init_quant(per_channel)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.quantized_bias())


QUANT_LAYER_TYPES = (QuantConv2d, QuantLinear)


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Conv with BN folded in: w' = w * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta."""
    folded = copy.deepcopy(conv)
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = (gamma / std).detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(std)
    with torch.no_grad():
        folded.weight = nn.Parameter(conv.weight.detach() * factor.view(-1, 1, 1, 1))
        folded.bias = nn.Parameter((bias - bn.running_mean) * factor + beta.detach())
    return folded


@dataclass
class SurgeryInfo:
    layers: list[str] = field(default_factory=list)          # quantized conv/linear, graph order
    act_quants: list[str] = field(default_factory=list)      # inserted QuantAct modules
    folded_bn: dict[str, str] = field(default_factory=dict)  # bn name -> conv name
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


def _is_normalizer(module: nn.Module) -> bool:
    return isinstance(getattr(module, "mean", None), torch.Tensor) and \
        isinstance(getattr(module, "std", None), torch.Tensor)


class _Tracer(fx.Tracer):
    """Keeps input-normalization modules whole (one quantization point after them)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_normalizer(m) or super().is_leaf_module(m, qualname)


def prepare(model: nn.Module, act_bits: int | None = 8, per_channel: bool = True,
            percentile: float | None = None, act_range: str = "minmax") -> tuple[fx.GraphModule, SurgeryInfo]:
    """Trace a copy of ``model`` (eval mode), fold BNs, insert quantized layers and QuantActs."""
    model = copy.deepcopy(model).eval()
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as exc:  # tracing errors come in many types
        raise ValueError(f"model could not be traced by torch.fx ({type(exc).__name__}: {exc}); "
                         "pyzeroq needs a symbolically traceable model") from exc
    info = SurgeryInfo()
    graph = gm.graph

    # 1. fold BNs into the conv they consume
    for node in list(graph.nodes):
        if not _is_module(gm, node, (nn.BatchNorm2d,)):
            continue
        src = node.args[0]
        if isinstance(src, fx.Node) and _is_module(gm, src, (nn.Conv2d,)) and len(src.users) == 1:
            _set_submodule(gm, src.target, fold_bn(gm.get_submodule(src.target), gm.get_submodule(node.target)))
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            info.folded_bn[node.target] = src.target
        else:
            info.float_ops.append(f"{node.target} (BatchNorm not foldable)")

    # 2. swap conv/linear for quantized versions
    for node in graph.nodes:
        if _is_module(gm, node, (nn.Conv2d,)):
            _set_submodule(gm, node.target, QuantConv2d.from_float(gm.get_submodule(node.target), per_channel))
            info.layers.append(node.target)
        elif _is_module(gm, node, (nn.Linear,)):
            _set_submodule(gm, node.target, QuantLinear.from_float(gm.get_submodule(node.target), per_channel))
            info.layers.append(node.target)

    # 3. activation quantization points
    output_inputs = {n for n in graph.nodes if n.op == "output" for n in n.all_input_nodes}
    points: list[fx.Node] = []
    for node in graph.nodes:
        if node.op == "placeholder":
            if not any(u.op == "call_module" and _is_normalizer(gm.get_submodule(u.target)) for u in node.users):
                points.append(node)
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if _is_normalizer(mod) or isinstance(mod, POOL_MODULES):
                points.append(node)
            elif isinstance(mod, QUANT_LAYER_TYPES):
                points.append(_fused_relu(gm, node) or node)
            elif isinstance(mod, RELU_MODULES + (nn.Identity, nn.Dropout, nn.Flatten)):
                pass  # clamps / passthroughs keep their input's quantization
            else:
                info.float_ops.append(f"{node.target} ({type(mod).__name__})")
        elif node.op == "call_function":
            if node.target in ADD_FUNCTIONS and all(isinstance(a, fx.Node) for a in node.args[:2]):
                points.append(_fused_relu(gm, node) or node)
            elif node.target in PASSTHROUGH_FUNCTIONS or node.target in RELU_FUNCTIONS:
                pass
            else:
                info.float_ops.append(f"{node.name} ({getattr(node.target, '__name__', node.target)})")
        elif node.op == "call_method" and node.target not in ("view", "reshape", "flatten", "size"):
            info.float_ops.append(f"{node.name} (.{node.target})")

    inserted: dict[fx.Node, QuantAct] = {}
    for i, node in enumerate(points):
        if node in output_inputs:
            continue  # logits stay float (dequantized accumulator)
        name = f"act_quant_{i}"
        quant = QuantAct(act_bits, percentile, act_range)
        if node.op == "call_module" and _is_normalizer(gm.get_submodule(node.target)):
            # models take images in [0, 1]: the normalized range is known exactly, so the
            # input quantizer does not depend on the (unbounded) calibration images
            norm = gm.get_submodule(node.target)
            lo, hi = (0.0 - norm.mean) / norm.std, (1.0 - norm.mean) / norm.std
            quant.fixed_range = (float(torch.minimum(lo, hi).min()), float(torch.maximum(lo, hi).max()))
        gm.add_module(name, quant)
        with graph.inserting_after(node):
            q = graph.call_module(name, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
        info.act_quants.append(name)
        inserted[node] = quant
    # a pooled tensor lies within its input's range: same scale and zero point (no calibration
    # of its own, which on distilled data can clip the features the classifier reads)
    for node, quant in inserted.items():
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), POOL_MODULES):
            src = node.args[0]
            if isinstance(src, fx.Node) and src.op == "call_module" and \
                    isinstance(gm.get_submodule(src.target), QuantAct):
                object.__setattr__(quant, "same_as", gm.get_submodule(src.target))

    # 4. tell each quantized layer which quantizer feeds it (for bias quantization)
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), QUANT_LAYER_TYPES):
            src = node.args[0]
            while isinstance(src, fx.Node) and not (src.op == "call_module" and
                                                    isinstance(gm.get_submodule(src.target), QuantAct)):
                nxt = [a for a in src.all_input_nodes]
                src = nxt[0] if len(nxt) == 1 else None
            if isinstance(src, fx.Node):
                # plain attribute, not a registered submodule (would duplicate it in state_dict)
                object.__setattr__(gm.get_submodule(node.target), "input_quant", gm.get_submodule(src.target))
    graph.lint()
    gm.delete_all_unused_submodules()  # the folded BNs
    gm.recompile()
    return gm, info


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
