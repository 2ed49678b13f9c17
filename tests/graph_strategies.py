"""Hypothesis strategies for random small CNNs built from the supported-op table, and the
pipeline properties the fuzzer checks on them (tests/test_fuzz_pipeline.py, bench/fuzz_pipeline.py).

The op table is README's "Supported operators" (every op has a fake-quant forward, a record
rule, an integer step and an ONNX emission): input Normalize + quantize; Conv2d (+BN folded,
+ReLU / ReLU6 fused; groups / depthwise, stride, zero padding incl. "same", dilation, with or
without bias); residual add (+ReLU / ReLU6); AdaptiveAvgPool2d(1), AvgPool2d
(count_include_pad), MaxPool2d; standalone ReLU / ReLU6; the lookup-table activations
(Hardswish, Hardsigmoid, SiLU, GELU, Sigmoid, Tanh, LeakyReLU, Hardtanh as modules, functions
and methods); flatten / view / reshape / nn.Flatten; Identity / Dropout; hidden Linear
(+ReLU / ReLU6 / lookup); the final Linear (float logits); torch.cat (any dim, 2-3 inputs, the
same value twice too); functional pools and spatial means (F.max_pool2d / F.avg_pool2d /
F.adaptive_avg_pool2d(x, 1), x.mean((2, 3)) [keepdim]).
Not here yet (no integer step / ONNX emission when this was written; the operator-coverage
issue): interpolation, map (non-logits) outputs, dict / tuple outputs, BatchNorm not directly
after a conv. A new op goes into ``graphs`` (and ``FuzzNet``) when it lands.

A network is a :class:`GraphSpec`: plain frozen dataclasses (their ``repr`` is a constructor
call, so a shrunk failure prints a complete reproduction), turned into an fx-traceable
``nn.Module`` by :class:`FuzzNet` (``forward`` loops over the fixed op list: fx unrolls it at
trace time). Weights come from per-layer :class:`Init` recipes (seeded numpy draws): per
output channel a normal scale from 1e-9 to 1e3 (mixtures within a layer), all-zero output
channels, constant channels (zero weights, nonzero bias), BN with tiny running variances and
zero gammas.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import fx, nn

import pyzeroq as zq
from pyzeroq.integer import steps as S
from pyzeroq.integer.drift import code_drift
from pyzeroq.models.layers import Normalize
from pyzeroq.modules import QuantAct

# ----------------------------------------------------------------------------- the spec

SCALES = (1.0, 0.1, 10.0, 1e-3, 1e3, 1e-6, 1e-9)  # weight / bias std; shrinks towards 1.0
REGIMES = {"mixed": SCALES, "tiny": (1e-3, 1e-6, 1e-9), "huge": (10.0, 1e2, 1e3)}  # per network
VARIANCES = (1.0, 0.01, 100.0, 1e-6, 1e-10)       # BN running_var scale; shrinks towards 1.0
ACTS = (None, "relu", "relu6", "f_relu", "f_relu6")  # module or functional clamps (fused)
# elementwise activations with an integer lookup table (QuantAct after each, LookupStep):
# module, F.* / torch.* function ("f_"), tensor method ("m_")
LOOKUPS = ("hardswish", "hardsigmoid", "silu", "gelu", "sigmoid", "tanh", "leaky_relu", "hardtanh",
           "f_hardswish", "f_hardsigmoid", "f_silu", "f_gelu", "f_sigmoid", "f_tanh", "f_leaky_relu", "f_hardtanh",
           "torch_sigmoid", "torch_tanh", "m_sigmoid", "m_tanh")
FLATTEN_STYLES = ("torch", "module", "method", "view_int", "reshape_int", "view", "reshape")


@dataclass(frozen=True)
class Init:
    """Weights of one conv / linear: channel ``c`` ~ N(0, scales[c % len(scales)]), channels in
    ``zero`` all zero; bias ~ N(0, bias) (None: no bias); channels in ``const`` get zero weights
    and bias ``bias or 1`` (a constant channel)."""

    seed: int = 0
    scales: tuple = (1.0,)
    zero: tuple = ()
    const: tuple = ()
    bias: Optional[float] = None


@dataclass(frozen=True)
class BN:
    """BatchNorm after a conv: running_var ~ var * U(0.5, 2), running_mean ~ N(0, mean),
    gamma ~ N(1, 0.5) with channels ``zero_gamma`` at 0, beta ~ N(0, beta); ``affine=False`` too."""

    seed: int = 0
    var: float = 1.0
    mean: float = 0.5
    beta: float = 0.3
    zero_gamma: tuple = ()
    affine: bool = True


@dataclass(frozen=True)
class Conv:
    src: int
    out: int
    kernel: int = 3
    stride: int = 1
    padding: Union[int, str] = 1
    dilation: int = 1
    groups: int = 1
    init: Init = Init()
    bn: Optional[BN] = None
    act: Optional[str] = None


@dataclass(frozen=True)
class Add:
    a: int
    b: int
    act: Optional[str] = None
    style: str = "op"  # "op" (a + b) | "torch" (torch.add)


@dataclass(frozen=True)
class Pool:
    src: int
    kind: str  # "max" | "avg" | "gap" (modules); "f_max" | "f_avg" | "f_gap" (F.*_pool2d); "mean" (x.mean((2, 3)):
    # [N, C]), "mean_keep" (x.mean(dim=(-2, -1), keepdim=True)), "torch_mean" (torch.mean(x, (2, 3)): [N, C])
    kernel: int = 2
    stride: int = 2
    padding: int = 0


@dataclass(frozen=True)
class Cat:
    srcs: tuple
    dim: int = 1


@dataclass(frozen=True)
class Act:
    """A standalone activation (``ACTS`` / ``LOOKUPS`` name) on a value: a ClampStep / LookupStep, or
    fused when the value is an add / layer output with no other user."""

    src: int
    kind: str = "relu"


@dataclass(frozen=True)
class Passthrough:
    src: int
    kind: str = "identity"  # "identity" | "dropout"


@dataclass(frozen=True)
class Flatten:
    src: int
    style: str = "torch"  # torch.flatten(x, 1) | "module" (nn.Flatten) | "method" (x.flatten(1)) |
    # "view" / "reshape" (x.view(x.size(0), -1)) | "view_int" / "reshape_int" (x.view(-1, features))


@dataclass(frozen=True)
class Linear:
    src: int
    out: int
    init: Init = Init()
    act: Optional[str] = None


Op = Union[Conv, Add, Pool, Cat, Act, Passthrough, Flatten, Linear]


@dataclass(frozen=True)
class GraphSpec:
    """value 0 is the normalized input; op i writes value i + 1; the last op is the final Linear."""

    input_shape: tuple  # (C, H, W)
    mean: tuple
    std: tuple
    ops: tuple

    def shapes(self) -> list:
        return infer_shapes(self)


@dataclass(frozen=True)
class Case:
    """One fuzz example: the network, the quantization settings and the test images."""

    graph: GraphSpec
    weight_bits: Union[int, tuple] = 8   # int: uniform (QuantConfig); tuple: one per layer (set_weight_bits
                                         # + fit_bias_scales after quantize)
    mixed: Optional[float] = None        # QuantConfig(weight_bits=(2, 4, 8), avg_weight_bits=mixed): the Pareto search
    act_bits: int = 8
    per_channel: bool = True
    act_range: str = "minmax"
    percentile: Optional[float] = None
    images_seed: int = 0
    special_images: tuple = ()  # "zeros", "ones", "half", "over" (2.0), "under" (-1.0): constant images
    uint8: bool = False          # also export with pixels="uint8"

    def config(self) -> zq.QuantConfig:
        wb = self.weight_bits if isinstance(self.weight_bits, int) else 8
        if self.mixed is not None:
            wb = (2, 4, 8)
        return zq.QuantConfig(weight_bits=wb, avg_weight_bits=self.mixed, act_bits=self.act_bits,
                              calibration="gaussian", num_samples=8, per_channel=self.per_channel,
                              act_range=self.act_range, percentile=self.percentile, progress=False)


def conv_out(size: int, k: int, s: int, p, d: int) -> int:
    if p == "same":
        return size
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def infer_shapes(g: GraphSpec) -> list:
    shapes = [tuple(g.input_shape)]
    for op in g.ops:
        if isinstance(op, Conv):
            c, h, w = shapes[op.src]
            shapes.append((op.out, conv_out(h, op.kernel, op.stride, op.padding, op.dilation),
                           conv_out(w, op.kernel, op.stride, op.padding, op.dilation)))
        elif isinstance(op, Add):
            shapes.append(shapes[op.a])
        elif isinstance(op, Pool):
            c, h, w = shapes[op.src]
            if op.kind in ("gap", "f_gap", "mean_keep"):
                shapes.append((c, 1, 1))
            elif op.kind in ("mean", "torch_mean"):
                shapes.append((c,))
            else:
                shapes.append((c, conv_out(h, op.kernel, op.stride, op.padding, 1),
                               conv_out(w, op.kernel, op.stride, op.padding, 1)))
        elif isinstance(op, Cat):
            first = shapes[op.srcs[0]]
            d = op.dim - 1
            shapes.append(first[:d] + (sum(shapes[i][d] for i in op.srcs),) + first[d + 1:])
        elif isinstance(op, (Act, Passthrough)):
            shapes.append(shapes[op.src])
        elif isinstance(op, Flatten):
            shapes.append((int(np.prod(shapes[op.src])),))
        elif isinstance(op, Linear):
            shapes.append((op.out,))
        else:
            raise TypeError(op)
    return shapes


# ----------------------------------------------------------------------------- the module

def _weights(init: Init, shape: tuple) -> tuple:
    rng = np.random.default_rng(init.seed)
    out = shape[0]
    scales = np.array([init.scales[c % len(init.scales)] for c in range(out)], np.float64)
    w = rng.standard_normal(shape) * scales.reshape((-1,) + (1,) * (len(shape) - 1))
    b = None
    if init.bias is not None or init.const:
        b = rng.standard_normal(out) * (init.bias if init.bias is not None else 0.0)
    for c in init.zero:
        if c < out:
            w[c] = 0.0
    for c in init.const:
        if c < out:
            w[c] = 0.0
            b[c] = (init.bias or 1.0) * (1.0 + c)
    return torch.tensor(w, dtype=torch.float32), None if b is None else torch.tensor(b, dtype=torch.float32)


def _set(layer: nn.Module, init: Init) -> None:
    w, b = _weights(init, tuple(layer.weight.shape))
    with torch.no_grad():
        layer.weight.copy_(w)
        if layer.bias is not None:
            layer.bias.copy_(b if b is not None else torch.zeros_like(layer.bias))


def _bn(spec: BN, channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, affine=spec.affine)
    rng = np.random.default_rng(spec.seed)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor(spec.var * rng.uniform(0.5, 2.0, channels), dtype=torch.float32))
        bn.running_mean.copy_(torch.tensor(rng.standard_normal(channels) * spec.mean, dtype=torch.float32))
        if spec.affine:
            gamma = rng.normal(1.0, 0.5, channels)
            for c in spec.zero_gamma:
                if c < channels:
                    gamma[c] = 0.0
            bn.weight.copy_(torch.tensor(gamma, dtype=torch.float32))
            bn.bias.copy_(torch.tensor(rng.standard_normal(channels) * spec.beta, dtype=torch.float32))
    return bn


_ACT_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid,
                "silu": nn.SiLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
                "leaky_relu": lambda: nn.LeakyReLU(0.1), "hardtanh": lambda: nn.Hardtanh(-0.5, 2.0)}
_ACT_FUNCTIONS = {"f_relu": F.relu, "f_relu6": F.relu6, "f_hardswish": F.hardswish, "f_hardsigmoid": F.hardsigmoid,
                  "f_silu": F.silu, "f_gelu": F.gelu, "f_sigmoid": F.sigmoid, "f_tanh": F.tanh,
                  "f_leaky_relu": F.leaky_relu, "f_hardtanh": F.hardtanh, "torch_sigmoid": torch.sigmoid,
                  "torch_tanh": torch.tanh}


class FuzzNet(nn.Module):
    """The fx-traceable module of a :class:`GraphSpec` (eval mode)."""

    def __init__(self, spec: GraphSpec):
        super().__init__()
        self.spec = spec
        self.ops = spec.ops
        self.normalize = Normalize(spec.mean, spec.std)
        self.layers = nn.ModuleDict()
        shapes = infer_shapes(spec)
        self.features = [shapes[i + 1][0] for i in range(len(spec.ops))]
        for i, op in enumerate(spec.ops):
            key = f"op{i}"
            if isinstance(op, Conv):
                conv = nn.Conv2d(shapes[op.src][0], op.out, op.kernel, stride=op.stride, padding=op.padding,
                                 dilation=op.dilation, groups=op.groups,
                                 bias=op.init.bias is not None or bool(op.init.const))
                _set(conv, op.init)
                self.layers[key] = conv
                if op.bn is not None:
                    self.layers[key + "_bn"] = _bn(op.bn, op.out)
            elif isinstance(op, Linear):
                lin = nn.Linear(shapes[op.src][0], op.out, bias=op.init.bias is not None or bool(op.init.const))
                _set(lin, op.init)
                self.layers[key] = lin
            elif isinstance(op, Pool) and op.kind in ("gap", "max", "avg"):
                self.layers[key] = (nn.AdaptiveAvgPool2d(1) if op.kind == "gap" else
                                    nn.MaxPool2d(op.kernel, op.stride, op.padding) if op.kind == "max" else
                                    nn.AvgPool2d(op.kernel, op.stride, op.padding))
            elif isinstance(op, Passthrough):
                self.layers[key] = nn.Identity() if op.kind == "identity" else nn.Dropout(0.5)
            elif isinstance(op, Flatten) and op.style == "module":
                self.layers[key] = nn.Flatten()
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
        for i, op in enumerate(self.ops):
            key = f"op{i}"
            if isinstance(op, (Conv, Linear)):
                y = self.layers[key](vals[op.src])
                if isinstance(op, Conv) and op.bn is not None:
                    y = self.layers[key + "_bn"](y)
                y = self._act(key, op.act, y)
            elif isinstance(op, Add):
                y = torch.add(vals[op.a], vals[op.b]) if op.style == "torch" else vals[op.a] + vals[op.b]
                y = self._act(key, op.act, y)
            elif isinstance(op, Act):
                y = self._act(key, op.kind, vals[op.src])
            elif isinstance(op, Flatten):
                v = vals[op.src]
                if op.style == "module":
                    y = self.layers[key](v)
                elif op.style == "view":
                    y = v.view(v.size(0), -1)
                elif op.style == "reshape":
                    y = v.reshape(v.size(0), -1)
                elif op.style == "view_int":
                    y = v.view(-1, self.features[i])
                elif op.style == "reshape_int":
                    y = v.reshape(-1, self.features[i])
                elif op.style == "method":
                    y = v.flatten(1)
                else:
                    y = torch.flatten(v, 1)
            elif isinstance(op, Cat):
                y = torch.cat([vals[j] for j in op.srcs], dim=op.dim)
            elif isinstance(op, Pool) and op.kind not in ("gap", "max", "avg"):
                v = vals[op.src]
                if op.kind == "f_max":
                    y = F.max_pool2d(v, op.kernel, op.stride, op.padding)
                elif op.kind == "f_avg":
                    y = F.avg_pool2d(v, op.kernel, op.stride, op.padding)
                elif op.kind == "f_gap":
                    y = F.adaptive_avg_pool2d(v, 1)
                elif op.kind == "mean":
                    y = v.mean((2, 3))
                elif op.kind == "mean_keep":
                    y = v.mean(dim=(-2, -1), keepdim=True)
                else:
                    y = torch.mean(v, (2, 3))
            else:  # Pool (modules), Passthrough
                y = self.layers[key](vals[op.src])
            vals.append(y)
        return vals[-1]


# ----------------------------------------------------------------------------- strategies

def acts() -> st.SearchStrategy:
    """The activation after a conv / linear / add: none, a fused ReLU(6) or (1 in 4) a lookup."""
    return st.integers(0, 3).flatmap(lambda k: st.sampled_from(LOOKUPS if k == 3 else ACTS))


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def inits(draw, out: int, allow_bias: bool = True, regime: str = "mixed") -> Init:
    mixture = draw(st.integers(1, 3))
    scales = tuple(draw(st.sampled_from(REGIMES[regime])) for _ in range(mixture))
    special = st.lists(st.integers(0, max(out - 1, 0)), max_size=min(out, 2), unique=True).map(tuple)
    zero = draw(special) if draw(st.integers(0, 3)) == 0 else ()
    const = draw(special) if allow_bias and draw(st.integers(0, 4)) == 0 else ()
    bias = draw(st.none() | st.sampled_from(SCALES)) if allow_bias else None
    return Init(seed=draw(st.integers(0, 2**16)), scales=scales, zero=tuple(c for c in zero if c not in const),
                const=const, bias=bias)


@st.composite
def bns(draw, channels: int) -> BN:
    zero_gamma = draw(st.lists(st.integers(0, channels - 1), max_size=1, unique=True).map(tuple)) \
        if draw(st.integers(0, 4)) == 0 else ()
    return BN(seed=draw(st.integers(0, 2**16)), var=draw(st.sampled_from(VARIANCES)),
              mean=draw(st.sampled_from((0.5, 0.0, 10.0))), beta=draw(st.sampled_from((0.3, 0.0, 5.0))),
              zero_gamma=zero_gamma, affine=draw(st.booleans()) if draw(st.integers(0, 5)) == 0 else True)


@st.composite
def convs(draw, src: int, shape: tuple, out: Optional[int] = None, same_shape: bool = False,
          regime: str = "mixed") -> Conv:
    c, h, w = shape
    depthwise = out is None and draw(st.integers(0, 3)) == 0
    if depthwise:  # groups = in channels, channel multiplier 1 or 2 (at most 8 channels)
        out = c * draw(st.sampled_from((1, 2)))
        out = out if out <= 8 else c
    elif out is None:
        out = draw(st.integers(1, 8))
    groups = c if depthwise else draw(st.sampled_from(_divisors(math.gcd(c, out))))
    kernel = draw(st.sampled_from((3, 1, 5)))
    dilation = draw(st.sampled_from((1, 2))) if kernel > 1 and draw(st.integers(0, 4)) == 0 else 1
    if same_shape:
        stride, padding = 1, dilation * (kernel // 2)
        if draw(st.integers(0, 4)) == 0:
            padding = "same"
    else:
        stride = draw(st.sampled_from((1, 2)))
        padding = draw(st.integers(0, dilation * (kernel // 2)))
        if stride == 1 and draw(st.integers(0, 6)) == 0:
            padding = "same"
        # keep the output at least 1 x 1
        while min(conv_out(h, kernel, stride, padding, dilation), conv_out(w, kernel, stride, padding, dilation)) < 1:
            kernel, dilation, padding = 1, 1, 0
    bn = draw(bns(out)) if draw(st.booleans()) else None
    return Conv(src, out, kernel, stride, padding, dilation, groups, init=draw(inits(out, regime=regime)), bn=bn,
                act=draw(acts()))


@st.composite
def graphs(draw, max_ops: int = 6) -> GraphSpec:
    """A random network: input (1..3 channels, 6..16 pixels), 0..max_ops trunk ops, a flatten, 0..2
    hidden Linear layers (+ an occasional add between them), the final Linear (logits)."""
    cin = draw(st.integers(1, 3))
    h = draw(st.integers(6, 16))
    w = draw(st.integers(6, 16)) if draw(st.integers(0, 3)) == 0 else h
    mean = tuple(draw(st.sampled_from((0.5, 0.0, 0.286))) for _ in range(cin))
    std = tuple(draw(st.sampled_from((0.5, 1.0, 0.353, 0.01))) for _ in range(cin))
    regime = draw(st.sampled_from(tuple(REGIMES)))  # weight scales of the whole network
    spec_ops: list = []
    shapes = [(cin, h, w)]

    def push(op):
        spec_ops.append(op)
        shapes[:] = infer_shapes(GraphSpec((cin, h, w), mean, std, tuple(spec_ops)))

    def pick_src() -> int:  # mostly the newest value, sometimes an older one (branches)
        n = len(shapes)
        return n - 1 if draw(st.integers(0, 2)) else draw(st.integers(0, n - 1))

    for _ in range(draw(st.integers(0, max_ops))):
        kind = draw(st.sampled_from(("conv", "add", "pool", "conv", "relu", "passthrough", "cat")))
        src = pick_src()
        shape = shapes[src]
        if len(shape) == 1 and kind in ("conv", "pool"):  # [N, C] after a spatial mean: elementwise ops only
            kind = "relu"
        if kind == "conv":
            push(draw(convs(src, shape, regime=regime)))
        elif kind == "add":
            partners = [j for j, s in enumerate(shapes) if s == shape and j != src]
            if partners and draw(st.booleans()):
                b = draw(st.sampled_from(partners))
            elif draw(st.integers(0, 5)) == 0:
                b = src  # x + x
            elif len(shape) == 3:  # a residual branch: a same-shape conv on src, added back
                push(draw(convs(src, shape, out=shape[0], same_shape=True, regime=regime)))
                b = len(shapes) - 1
            else:
                b = src
            a, b = (src, b) if draw(st.booleans()) else (b, src)
            push(Add(a, b, act=draw(acts()), style=draw(st.sampled_from(("op", "torch")))))
        elif kind == "pool":
            pk = draw(st.sampled_from(("max", "avg", "gap", "f_max", "f_avg", "f_gap", "mean", "mean_keep",
                                       "torch_mean")))
            c, ph, pw = shape
            k = draw(st.sampled_from((2, 3)))
            if pk in ("gap", "f_gap", "mean", "mean_keep", "torch_mean") or min(ph, pw) < k:
                push(Pool(src, pk if pk not in ("max", "avg", "f_max", "f_avg") else "gap"))
                continue
            stride = draw(st.sampled_from((k, 1, 2)))
            pad = draw(st.integers(0, k // 2))
            push(Pool(src, pk, k, stride, pad))
        elif kind == "cat":  # values equal in every dim but ``dim`` (the same value twice too)
            dim = draw(st.sampled_from((1, 1, 2, 3))) if len(shape) == 3 else 1
            d = dim - 1
            partners = [j for j, s in enumerate(shapes)
                        if len(s) == len(shape) and s[:d] + s[d + 1:] == shape[:d] + shape[d + 1:]]
            others = draw(st.lists(st.sampled_from(partners), min_size=1, max_size=2))
            srcs = [src] + others
            push(Cat(tuple(draw(st.permutations(srcs))), dim))
        elif kind == "relu":
            push(Act(src, draw(st.sampled_from(("relu", "f_relu", "relu", "relu6")) | st.sampled_from(LOOKUPS))))
        else:
            push(Passthrough(src, draw(st.sampled_from(("identity", "dropout")))))

    src = len(shapes) - 1
    push(Flatten(src, draw(st.sampled_from(FLATTEN_STYLES))))
    for _ in range(draw(st.integers(0, 2))):
        out = draw(st.integers(1, 8))
        push(Linear(len(shapes) - 1, out, init=draw(inits(out, regime=regime)), act=draw(acts())))
        if draw(st.integers(0, 4)) == 0:  # an add between two hidden features of equal width
            a = len(shapes) - 1
            push(Linear(a, out, init=draw(inits(out, regime=regime)), act=draw(acts())))
            push(Add(a, len(shapes) - 1, act=draw(acts())))
    classes = draw(st.integers(1, 10))
    push(Linear(len(shapes) - 1, classes, init=draw(inits(classes, regime=regime))))
    return GraphSpec((cin, h, w), mean, std, tuple(spec_ops))


def num_layers(g: GraphSpec) -> int:
    return sum(isinstance(op, (Conv, Linear)) for op in g.ops)


@st.composite
def cases(draw, max_ops: int = 6) -> Case:
    g = draw(graphs(max_ops))
    bits = st.sampled_from((8, 4, 2)) | st.integers(2, 8)
    how = draw(st.sampled_from(("uniform", "per_layer", "mixed")))
    wb: Union[int, tuple] = draw(bits) if how == "uniform" else 8
    if how == "per_layer":
        wb = tuple(draw(bits) for _ in range(num_layers(g)))
    act_range = draw(st.sampled_from(("minmax", "mse", "percentile"))) if draw(st.integers(0, 3)) == 0 else "minmax"
    return Case(graph=g, weight_bits=wb, mixed=draw(st.sampled_from((4.0, 3.0, 6.0))) if how == "mixed" else None,
                act_bits=draw(st.sampled_from((8, 4, 6, 2)) | st.integers(2, 8)),
                per_channel=draw(st.booleans()) if draw(st.integers(0, 3)) == 0 else True,
                act_range="mse" if act_range == "mse" else "minmax",
                percentile=draw(st.sampled_from((99.99, 99.0))) if act_range == "percentile" else None,
                images_seed=draw(st.integers(0, 2**16)),
                special_images=tuple(draw(st.lists(st.sampled_from(tuple(SPECIAL_IMAGES)), max_size=2,
                                                   unique=True))),
                uint8=draw(st.integers(0, 3)) == 0)


# ----------------------------------------------------------------------------- running a case

BATCH = 6
SPECIAL_IMAGES = {"zeros": 0.0, "ones": 1.0, "half": 0.5, "over": 2.0, "under": -1.0}

# quantize / to_integer errors that name a legitimately unsupported combination: a discard
UNSUPPORTED = (
    re.compile(r"ReLU6 that is not followed by an activation quantizer is exact only when 6\.0 is a code"),
    re.compile(r"dyadic multiplier b = round\(M \* 2\^n\) does not fit 32 bits"),
)


class Unsupported(Exception):
    """The pipeline refused the case with a clear message for an unsupported combination."""


def images(case: Case, pixels: bool = False) -> np.ndarray:
    c, h, w = case.graph.input_shape
    rng = np.random.default_rng(case.images_seed)
    x = rng.random((BATCH, c, h, w), dtype=np.float32) ** 2
    x = np.concatenate([x] + [np.full((1, c, h, w), SPECIAL_IMAGES[s], np.float32) for s in case.special_images])
    if pixels:
        return np.clip(np.rint(x.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    return x


def build(case: Case, ctx: Optional[dict] = None):
    """(float model, quantized model, integer model); raises Unsupported for a clear refusal.
    ``ctx`` receives "q" / "im" as soon as they exist (for classifying a failure)."""
    ctx = {} if ctx is None else ctx
    torch.manual_seed(0)
    model = FuzzNet(case.graph)
    try:
        q = ctx["q"] = zq.quantize(model, case.config(), input_shape=case.graph.input_shape)
        if not isinstance(case.weight_bits, int):
            from pyzeroq.modules import fit_bias_scales, set_weight_bits
            bits = dict(zip(q.report.layers, case.weight_bits))
            set_weight_bits(q.graph_module, bits)
            fit_bias_scales(q.graph_module, q.config.bias_overflow)  # as its docstring asks after new bits
            q.bit_widths = bits  # set_weight_bits leaves QuantizedModel.bit_widths (what save() writes) as it was
        im = ctx["im"] = zq.to_integer(q)
    except ValueError as exc:
        if any(p.search(str(exc)) for p in UNSUPPORTED):
            raise Unsupported(str(exc)) from exc
        raise
    return model, q, im


def dequantize(codes: np.ndarray, rec) -> torch.Tensor:
    s = np.float32(rec.scale_value)
    return torch.from_numpy((s * (codes.astype(np.float32) - np.float32(rec.zero_point_value))).astype(np.float32))


def _slot_of(node: fx.Node, env: dict) -> str:
    """The integer-model slot holding the codes of QuantAct node ``node``."""
    p = node
    while p.name not in env:
        p = p.args[0]
    return p.name


class _Forced(fx.Interpreter):
    """Runs the fake-quant graph with every QuantAct output replaced by the integer model's codes
    (dequantized), recording what the QuantAct computed from those same inputs: a per-activation
    (local) comparison that does not accumulate upstream differences."""

    def __init__(self, gm, env, slots):
        super().__init__(gm)
        self.int_env, self.slots, self.local = env, slots, {}

    def call_module(self, target, args, kwargs):
        out = super().call_module(target, args, kwargs)
        mod = self.module.get_submodule(target)
        if isinstance(mod, QuantAct) and target in self.slots:
            rec = mod.record()
            codes = rec.quantize(out.detach().numpy()).astype(np.int64)
            want = self.int_env[self.slots[target]]
            self.local[target] = (codes, want.astype(np.int64))
            return dequantize(want.reshape(out.shape), rec)
        return out


def fq_codes(q, x) -> tuple:
    """(codes of every QuantAct output of the fake-quant model keyed by module name, logits)."""
    out, hooks = {}, []
    for name, mod in q.graph_module.named_modules():
        if isinstance(mod, QuantAct):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: out.__setitem__(name, m.record().quantize(o.detach().numpy()).astype(np.int64))))
    try:
        with torch.no_grad():
            logits = q(torch.from_numpy(x))
    finally:
        for h in hooks:
            h.remove()
    return out, logits.numpy()


@dataclass
class Outcome:
    codes: int = 0          # activation codes compared (fake-quant vs integer, local)
    exact: int = 0          # of which identical
    max_local: int = 0      # largest local code difference
    e2e_codes: int = 0      # end to end (no forcing)
    e2e_exact: int = 0
    max_e2e: int = 0
    argmax_same: float = 1.0
    onnx_outputs: int = 0   # ONNX outputs compared (all levels)
    float_limited: int = 0  # local differences > 1 code explained by float32 accumulation in the fake-quant forward
    skipped: list = field(default_factory=list)  # optional checks refused with a clear error


def _onnx_session(model, level):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def check_onnx(im, x: np.ndarray, env: dict, pixels: str = "float", levels=None) -> int:
    """Property 2: onnxruntime runs the export (every intermediate activation as an output) and
    reproduces the integer model's codes and logits bit for bit. Returns the outputs compared."""
    import onnxruntime as ort

    from pyzeroq.export import build_onnx, output_names

    levels = levels or (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    model = build_onnx(im, x[:1], pixels=pixels, intermediate=True)
    n = 0
    for level in levels:
        s = _onnx_session(model, level)
        got = dict(zip([o.name for o in s.get_outputs()], s.run(None, {"input": x})))
        returned = dict(output_names(im.output))
        for name, value in got.items():
            want = env[returned.get(name, name)]
            np.testing.assert_array_equal(value, want, err_msg=f"onnx ({pixels}, {level}) vs integer: {name}")
            n += 1
    return n


def _logits_bound(im, env: dict) -> np.ndarray:
    """Per logit, the float32 rounding bound of the fake-quant logits layer given the same input codes."""
    return float_slack(next(s for s in im.steps if s.output == im.output), env) + np.finfo(np.float32).tiny


def check_roundtrip(q, im, x: np.ndarray, env: dict, fq_logits: np.ndarray) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        q2 = zq.load(q.save(Path(tmp) / "q.pzq"))
        with torch.no_grad():
            np.testing.assert_array_equal(q2(torch.from_numpy(x)).numpy(), fq_logits,
                                          err_msg="fake-quant model after save / load")
        im.save(Path(tmp) / "im.pzq")
        im2 = zq.load(Path(tmp) / "im.pzq")
        env2 = im2.run(x)
        for k, v in env.items():
            np.testing.assert_array_equal(env2[k], v, err_msg=f"integer model after save / load: {k}")
        env3 = zq.to_integer(q2).run(x)
        for k, v in env.items():
            np.testing.assert_array_equal(env3[k], v, err_msg=f"to_integer of the loaded model: {k}")


def _abs_terms(step, env: dict) -> Optional[np.ndarray]:
    """Per output element of a conv / linear step, ``sum |x * w| + |bias|`` (float64, real units) for
    the input codes in ``env``; None for other steps."""
    if not isinstance(step, (S.ConvStep, S.LinearStep, S.LogitsStep)):
        return None
    layer = step.layer
    codes = env[step.inputs[0]]
    xs, xz = float(layer.input.scale_value), layer.input.zero_point_value
    ws, wz = layer.weight.channels(layer.out_channels)
    shape = (-1,) + (1,) * (layer.weight_codes.ndim - 1)
    w = np.abs((layer.weight_codes.astype(np.float64) - wz.astype(np.float64).reshape(shape))
               * ws.astype(np.float64).reshape(shape))
    x = torch.from_numpy(np.abs(codes.astype(np.float64) - xz) * xs)
    b = None if layer.bias is None else \
        torch.from_numpy(np.abs(layer.bias.astype(np.float64) * xs * ws.astype(np.float64)))
    if isinstance(step, S.ConvStep):
        top, left, bottom, right = step.padding
        x = F.pad(x, (left, right, top, bottom))
        out = F.conv2d(x, torch.from_numpy(w), b, stride=step.stride, dilation=step.dilation, groups=step.groups)
    else:
        out = F.linear(x.reshape(len(x), -1), torch.from_numpy(w), b)
    return out.numpy()


def float_slack(step, env: dict) -> Optional[np.ndarray]:
    """Per output element, a bound on the float32 rounding error of the fake-quant forward of a
    conv / linear step (real units): ``(K + 4) * 2^-23 * sum |x * w|`` -- K products summed (any
    order, FMA or not), plus the float32 dequantization of inputs, weights and bias."""
    terms = _abs_terms(step, env)
    if terms is None:
        return None
    k = int(np.prod(step.layer.weight_codes.shape[1:]))
    return (k + 4) * 2.0 ** -23 * terms


def local_compare(q, im, x: np.ndarray, env: dict, tolerance: int, res: Outcome, what: str = "") -> dict:
    """Every QuantAct of the fake-quant model, fed the integer model's codes, gives codes within
    ``tolerance`` of the integer model's -- plus, after a conv / linear, what float32 accumulation
    error can explain (counted in ``res.float_limited``); the logits layer agrees within float32
    rounding. Returns {QuantAct name: integer slot}."""
    gm = q.graph_module
    slots = {str(n.target): _slot_of(n, env) for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QuantAct) and len(n.users)}
    producers = {s.output: s for s in im.steps}
    forced = _Forced(gm, env, slots)
    with torch.no_grad():
        forced_logits = forced.run(torch.from_numpy(x)).numpy()
    for name, (got, want) in forced.local.items():
        diff = np.abs(got.reshape(want.shape) - want)
        res.codes += diff.size
        res.exact += int((diff == 0).sum())
        res.max_local = max(res.max_local, int(diff.max(initial=0)))
        allowed = np.full(diff.shape, float(tolerance))
        slack = float_slack(producers[slots[name]], env) if slots[name] in producers else None
        if slack is not None:
            allowed = allowed + slack.reshape(diff.shape) / float(gm.get_submodule(name).record().scale_value)
            res.float_limited += int(((diff > tolerance) & (diff <= allowed)).sum())
        bad = diff > allowed
        assert not bad.any(), (
            f"{what}{name}: fake-quant and integer codes differ by {diff.max()} (> {tolerance} + float32 "
            f"accumulation slack {float((allowed - tolerance)[bad].max()):.3g}) given the same input codes; "
            f"{int(bad.sum())} of {diff.size} differ")
    int_logits = env[im.output]
    bound = _logits_bound(im, env)
    err = np.abs(forced_logits.astype(np.float64) - int_logits.astype(np.float64))
    assert (err <= bound + 1e-6 * np.abs(int_logits)).all(), (
        f"{what}logits: fake-quant (same input codes) vs integer differ by {err.max()} > float rounding bound "
        f"{bound.reshape(-1)[err.argmax()]}")
    return slots


class KnownIssue(Exception):
    """A failure of a known class (``kind``), with a regression test in tests/test_fuzz_regressions.py:
    the default fuzz run counts it instead of failing (set PYZEROQ_FUZZ_STRICT=1 to fail on it)."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"[{kind}] {message}")
        self.kind = kind


KNOWN_ISSUES = {
    # Fixed while the fuzzer was written, so no longer excused (they fail as new failures): int32 bias
    # overflow and all-zero weight channels (the bias-scale issue: pyzeroq.bias, fit_bias_scales), and
    # x.view(x.size(0), -1) before a layer (modules._quantized_source), and a grouped conv followed by
    # .view(...) under mixed precision (sensitivity.JointEvaluator falls back from vmap to a loop).
    "gemmlowp_shift": "rounding='gemmlowp' with a requantization multiplier M > 1: acc * 2^shift wraps in int32 "
                      "(multiply_by_quantized_multiplier), silently wrong codes",
    "gemmlowp_add_ratio": "rounding='gemmlowp' add with 2 max(s_a, s_b) / (2^20 s_out) >~ 1 (e.g. an all-zero input, "
                          "which gets scale 1.0): TFLite's fixed 20-bit left shift loses the smaller input and the "
                          "output multiplier (meant < 1) wraps; silently wrong codes",
}


def _gemmlowp_limit(q, im, message: str) -> Optional[str]:
    """The known gemmlowp limitation behind a "rounding=gemmlowp: <QuantAct>: ..." failure, if any:
    a conv / linear multiplier M > 1 (the int32 left shift wraps) or an add whose larger input scale
    is ~2^20 output codes (TFLite's 20-bit left shift cannot resolve the smaller input)."""
    m = re.match(r"rounding=gemmlowp: (\S+): ", message)
    if m is None or q is None or im is None:
        return None
    gm = q.graph_module
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == m.group(1)), None)
    if node is None:
        return None
    slot = node.args[0]
    producers = {s.output: s for s in im.steps}
    while isinstance(slot, fx.Node) and slot.name not in producers:
        slot = slot.args[0] if slot.args else None
    step = producers.get(slot.name) if isinstance(slot, fx.Node) else None
    if isinstance(step, (S.ConvStep, S.LinearStep)):
        layer = step.layer
        ws, _ = layer.weight.channels(layer.out_channels)
        mult = float(layer.input.scale_value) * ws.astype(np.float64) / float(layer.output.scale_value)
        return "gemmlowp_shift" if mult.max() > 1 else None
    if isinstance(step, S.AddStep):
        big = max(float(step.x_q.scale_value), float(step.y_q.scale_value))
        return "gemmlowp_add_ratio" if big / (2.0 ** 20 * float(step.quant.scale_value)) > 0.5 else None
    return None


def classify(case: Case, exc: BaseException, q=None, im=None) -> Optional[str]:
    """The known issue class of a failure, or None (a new failure)."""
    if isinstance(exc, AssertionError):
        return _gemmlowp_limit(q, im, str(exc))
    return None


def check_case(case: Case, onnx: bool = True, tolerance: int = 1, strict: bool = False,
               roundings: tuple = (), roundtrip: bool = False) -> Outcome:
    """Build the case and check the properties. Raises AssertionError (or the pipeline's error) on a
    new failure, :class:`KnownIssue` on a failure of a known class (unless ``strict``) and
    :class:`Unsupported` for a clear refusal of an unsupported combination."""
    ctx: dict = {}
    try:
        return _check(case, onnx, tolerance, roundings, roundtrip, ctx)
    except Unsupported:
        raise
    except Exception as exc:
        kind = None if strict else classify(case, exc, ctx.get("q"), ctx.get("im"))
        if kind is not None:
            raise KnownIssue(kind, f"{type(exc).__name__}: {str(exc)[:500]}") from exc
        raise


def _check(case: Case, onnx: bool, tolerance: int, roundings: tuple, roundtrip: bool, ctx: dict) -> Outcome:
    model, q, im = build(case, ctx)
    return check_quantized(q, im, images(case), onnx=onnx, tolerance=tolerance, roundings=roundings,
                           roundtrip=roundtrip, pixels=images(case, pixels=True) if case.uint8 else None)


def check_quantized(q, im, x: np.ndarray, onnx: bool = True, tolerance: int = 1, roundings: tuple = (),
                    roundtrip: bool = False, pixels: Optional[np.ndarray] = None) -> Outcome:
    """The properties on a quantized model ``q`` and its integer model ``im`` for float images ``x``
    (and uint8 ``pixels``); AssertionError on a failure. Returns the statistics."""
    res = Outcome()

    # property 1: finite everywhere, records sane
    for name, rec in {n: m.record() for n, m in q.graph_module.named_modules() if isinstance(m, QuantAct)}.items():
        s = float(rec.scale_value)
        assert math.isfinite(s) and s > 0, f"activation record {name}: scale {s}"
    codes, fq_logits = fq_codes(q, x)
    assert np.isfinite(fq_logits).all(), f"fake-quant logits not finite: {fq_logits}"
    env = im.run(x)
    int_logits = env[im.output]
    assert np.isfinite(int_logits).all(), f"integer logits not finite: {int_logits}"
    assert int_logits.dtype == np.float32 and int_logits.shape == fq_logits.shape

    # property 3: fake-quant vs integer, per activation given the same input codes (local) ...
    slots = local_compare(q, im, x, env, tolerance, res)
    for rounding in roundings:  # the other requantization modes, same tolerance
        other = zq.to_integer(q, rounding=rounding)
        try:
            other_env = other.run(x)
        except ValueError as exc:  # a clear refusal (dyadic multiplier too large for 32 bits)
            if not any(p.search(str(exc)) for p in UNSUPPORTED):
                raise
            res.skipped.append(f"rounding={rounding}: {exc}")
            continue
        local_compare(q, other, x, other_env, tolerance, Outcome(), what=f"rounding={rounding}: ")
    # ... and end to end (differences may propagate: statistics only)
    for name, slot in slots.items():
        if name in codes:
            d = np.abs(codes[name].reshape(env[slot].shape) - env[slot].astype(np.int64))
            res.e2e_codes += d.size
            res.e2e_exact += int((d == 0).sum())
            res.max_e2e = max(res.max_e2e, int(d.max(initial=0)))
    res.argmax_same = float((fq_logits.argmax(1) == int_logits.argmax(1)).mean())

    # property 5: the integer-exact fake-quant mode (zq.integer_exact) equals the integer model
    exact = zq.integer_exact(q)
    drift = code_drift(exact, im, x)
    assert all(d.differing == 0 for d in drift.layers), f"integer_exact vs integer model:\n{drift.to_markdown()}"
    with torch.no_grad():
        np.testing.assert_array_equal(exact(torch.from_numpy(x)).numpy(), int_logits,
                                      err_msg="integer_exact vs integer model: logits")

    # property 4: save / load round trips are exact (fake-quant model and integer model)
    if roundtrip:
        check_roundtrip(q, im, x, env, fq_logits)

    # property 2: ONNX
    if onnx:
        res.onnx_outputs += check_onnx(im, x, env)
        if pixels is not None:
            penv = im.run(pixels)
            np.testing.assert_array_equal(penv[im.output],
                                          im.run(pixels.astype(np.float32) / np.float32(255))[im.output],
                                          err_msg="uint8 pixels vs float pixels / 255: logits")
            res.onnx_outputs += check_onnx(im, pixels, penv, pixels="uint8")
    return res
