"""Hypothesis strategies drawing graph-fuzzer networks (:class:`graph_spec.GraphSpec`) and cases
(:class:`graph_spec.Case`) from README's supported-op table."""

from __future__ import annotations

import math
from typing import Optional, Union

from graph_spec import (
    SPECIAL_IMAGES,
    Act,
    Add,
    Case,
    Cat,
    Conv,
    Flatten,
    GraphSpec,
    Linear,
    Passthrough,
    Pool,
    conv_out,
    infer_shapes,
)
from graph_weights import REGIMES, bns, inits
from hypothesis import strategies as st

ACTS = (None, "relu", "relu6", "f_relu", "f_relu6")  # module or functional clamps (fused)
# elementwise activations with an integer lookup table (QuantAct after each, LookupStep):
# module, F.* / torch.* function ("f_"), tensor method ("m_")
LOOKUPS = ("hardswish", "hardsigmoid", "silu", "gelu", "sigmoid", "tanh", "leaky_relu", "hardtanh",
           "f_hardswish", "f_hardsigmoid", "f_silu", "f_gelu", "f_sigmoid", "f_tanh", "f_leaky_relu", "f_hardtanh",
           "torch_sigmoid", "torch_tanh", "m_sigmoid", "m_tanh")
FLATTEN_STYLES = ("torch", "module", "method", "view_int", "reshape_int", "view", "reshape")


def acts() -> st.SearchStrategy:
    """The activation after a conv / linear / add: none, a fused ReLU(6) or (1 in 4) a lookup."""
    return st.integers(0, 3).flatmap(lambda k: st.sampled_from(LOOKUPS if k == 3 else ACTS))


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


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
