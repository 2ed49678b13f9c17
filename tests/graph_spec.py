"""The graph fuzzer's network spec: plain frozen dataclasses (their ``repr`` is a constructor call,
so a shrunk failure prints a complete reproduction) and the shape rules of every op.

A network is a :class:`GraphSpec`: value 0 is the normalized input ([C, H, W] images, or [C, L]
signals), op i writes value i + 1; the model returns the last value, or the structure
``outputs`` (an :class:`Out`: tuple / list / dict of values, nested). Shapes are per sample
(no batch dim). :mod:`graph_net` turns a spec into a module, :mod:`graph_ops` draws specs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

import pyzeroq as zq


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
class Conv1d:
    """nn.Conv1d on a [C, L] value [+ BatchNorm1d folded] [+ act]."""

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
class ConvT:
    """nn.ConvTranspose2d (groups 1) [+ BatchNorm2d folded] [+ act]."""

    src: int
    out: int
    kernel: int = 2
    stride: int = 2
    padding: int = 0
    output_padding: int = 0
    dilation: int = 1
    init: Init = Init()
    bn: Optional[BN] = None
    act: Optional[str] = None


@dataclass(frozen=True)
class Norm:
    """A standalone BatchNorm2d ([C, H, W]) / BatchNorm1d ([F] or [C, L]) that follows no conv /
    linear (or one it cannot fold into: a pre-activation BN) [+ act]."""

    src: int
    bn: BN = BN()
    act: Optional[str] = None


@dataclass(frozen=True)
class Add:
    a: int
    b: int
    act: Optional[str] = None
    style: str = "op"  # "op" (a + b) | "torch" (torch.add)


@dataclass(frozen=True)
class Mul:
    """Elementwise product of two values, broadcast (squeeze-excite gating: x * sigmoid(...))."""

    a: int
    b: int
    act: Optional[str] = None
    style: str = "op"  # "op" (a * b) | "torch" (torch.mul)


@dataclass(frozen=True)
class Pool:
    src: int
    kind: str  # "max" | "avg" | "gap" (modules); "f_max" | "f_avg" | "f_gap" (F.*_pool2d); "mean" (x.mean((2, 3)):
    # [N, C]), "mean_keep" (x.mean(dim=(-2, -1), keepdim=True)), "torch_mean" (torch.mean(x, (2, 3)): [N, C]);
    # "adaptive" / "f_adaptive" (AdaptiveAvgPool2d(kernel), kernel an int or (h, w) dividing the input);
    # "gap1d" / "f_gap1d" (AdaptiveAvgPool1d(1) on [C, L]: [C, 1])
    kernel: Union[int, tuple] = 2
    stride: int = 2
    padding: int = 0
    ceil: bool = False  # max / f_max: ceil_mode=True


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
    """nn.Linear on the last dim of a value of any rank ([F], [C, L], [C, H, W])."""

    src: int
    out: int
    init: Init = Init()
    act: Optional[str] = None


@dataclass(frozen=True)
class Layout:
    """A data-movement op (codes move, record kept). ``kind`` / ``args``:
    "permute" / "torch_permute" (dims, batch dim 0 first), "transpose" / "torch_transpose" ((a, b)),
    "contiguous" (()), "upsample" (nn.Upsample) / "interpolate" (F.interpolate) ((fh, fw): nearest,
    integer factors), "zeropad" (nn.ZeroPad2d) / "pad" (F.pad) (torch's pad tuple, last dim first),
    "chunk" / "torch_chunk" ((n, dim, i): item i of x.chunk(n, dim)), "split" / "torch_split" ((s, dim,
    i); s an int or a tuple of sizes). Items of one chunk / split of one value share the node."""

    src: int
    kind: str
    args: tuple = ()


@dataclass(frozen=True)
class Reshape:
    """``x.view(*shape)`` / ``x.reshape(*shape)`` (``method``), each size an int (-1 once at most) or
    a token: ("size", v, d) (dim d of value v, batch dim 0) or (op, a, b) with op "floordiv" / "mul" /
    "add" / "sub". ``sizes``: how a size is read: "size" (v.size(d)), "size_all" (v.size()[d]),
    "shape" (v.shape[d])."""

    src: int
    shape: tuple
    method: str = "view"
    sizes: str = "size"


@dataclass(frozen=True)
class Shuffle:
    """ShuffleNet's channel shuffle of a [C, H, W] value: b, c, h, w = x.size() (``style``: "size",
    "shape" or "dims" for x.size(d) each); x.view(b, g, c // g, h, w).transpose(1, 2) (``swap``
    "permute": .permute(0, 2, 1, 3, 4)).contiguous().view(b, -1, h, w)."""

    src: int
    groups: int = 2
    style: str = "size"
    swap: str = "transpose"


Op = Union[Conv, Conv1d, ConvT, Norm, Add, Mul, Pool, Cat, Act, Passthrough, Flatten, Linear, Layout, Reshape, Shuffle]
LAYERS = (Conv, Conv1d, ConvT, Linear, Norm)  # ops that are (or may be) quantized layers


@dataclass(frozen=True)
class Out:
    """A structured model output: ``kind`` "tuple" / "list" (``items``: value indices or nested
    :class:`Out`) or "dict" (``items``: (string key, value index or :class:`Out`) pairs)."""

    kind: str
    items: tuple


@dataclass(frozen=True)
class GraphSpec:
    """value 0 is the normalized input; op i writes value i + 1; the model returns the last value
    (``outputs`` None) or the structure ``outputs``."""

    input_shape: tuple  # (C, H, W) or (C, L)
    mean: tuple
    std: tuple
    ops: tuple
    outputs: Optional[Out] = None

    def shapes(self) -> list:
        return infer_shapes(self)


SPECIAL_IMAGES = {"zeros": 0.0, "ones": 1.0, "half": 0.5, "over": 2.0, "under": -1.0}  # Case.special_images


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


# ----------------------------------------------------------------------------- shapes

def conv_out(size: int, k: int, s: int, p, d: int) -> int:
    if p == "same":
        return size
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def pool_out(size: int, k: int, s: int, p: int, ceil: bool = False) -> int:
    """torch's pooling output size (ceil_mode: a last window must start inside the input or the
    left padding)."""
    if not ceil:
        return (size + 2 * p - k) // s + 1
    out = -(-(size + 2 * p - k) // s) + 1
    return out - 1 if (out - 1) * s >= size + p else out


def convt_out(size: int, k: int, s: int, p: int, op: int, d: int) -> int:
    return (size - 1) * s - 2 * p + d * (k - 1) + op + 1


def split_sizes(kind: str, param, size: int) -> list:
    """The item sizes of ``chunk(param)`` / ``split(param)`` along a dim of ``size``."""
    if kind in ("chunk", "torch_chunk"):
        step = -(-size // param)
        return [min(step, size - s) for s in range(0, size, step)]
    if isinstance(param, int):
        return [min(param, size - s) for s in range(0, size, param)]
    return list(param)


BATCH_PROBE = 5  # the batch size reshape tokens are evaluated with (the batch dim must stay dim 0)


def eval_token(t, full: list) -> int:
    """A :class:`Reshape` size for per-value shapes ``full`` (batch :data:`BATCH_PROBE` first)."""
    if isinstance(t, int):
        return t
    if t[0] == "size":
        return full[t[1]][t[2]]
    a, b = eval_token(t[1], full), eval_token(t[2], full)
    return {"floordiv": a // b, "mul": a * b, "add": a + b, "sub": a - b}[t[0]]


def reshape_shape(shape: tuple, tokens: tuple, shapes: list) -> tuple:
    """The per-sample shape a :class:`Reshape` of a value of ``shape`` gives (ValueError if invalid)."""
    full = [(BATCH_PROBE,) + tuple(s) for s in shapes]
    dims = [eval_token(t, full) for t in tokens]
    numel = BATCH_PROBE * math.prod(shape)
    if dims.count(-1) == 1:
        known = math.prod(d for d in dims if d != -1)
        if known <= 0 or numel % known:
            raise ValueError(f"reshape {tokens} of {shape}")
        dims[dims.index(-1)] = numel // known
    if math.prod(dims) != numel or dims[0] != BATCH_PROBE or min(dims) < 1:
        raise ValueError(f"reshape {tokens} of {shape}")
    return tuple(dims[1:])


def broadcast(a: tuple, b: tuple) -> Optional[tuple]:
    """The broadcast of two per-sample shapes of equal rank, or None."""
    if len(a) != len(b) or any(x != y and 1 not in (x, y) for x, y in zip(a, b)):
        return None
    return tuple(max(x, y) for x, y in zip(a, b))


def _pool_shape(op: Pool, shape: tuple) -> tuple:
    if op.kind in ("gap1d", "f_gap1d"):
        return (shape[0], 1)
    c, h, w = shape
    if op.kind in ("gap", "f_gap", "mean_keep"):
        return (c, 1, 1)
    if op.kind in ("mean", "torch_mean"):
        return (c,)
    if op.kind in ("adaptive", "f_adaptive"):
        kh, kw = op.kernel if isinstance(op.kernel, tuple) else (op.kernel, op.kernel)
        return (c, kh, kw)
    return (c, pool_out(h, op.kernel, op.stride, op.padding, op.ceil), pool_out(w, op.kernel, op.stride, op.padding, op.ceil))


def _layout_shape(op: Layout, shape: tuple) -> tuple:
    full = (BATCH_PROBE,) + tuple(shape)
    k, a = op.kind, op.args
    if k in ("permute", "torch_permute"):
        return tuple(full[d] for d in a)[1:]
    if k in ("transpose", "torch_transpose"):
        s = list(full)
        s[a[0]], s[a[1]] = s[a[1]], s[a[0]]
        return tuple(s[1:])
    if k == "contiguous":
        return tuple(shape)
    if k in ("upsample", "interpolate"):
        return tuple(shape[:-2]) + (shape[-2] * a[0], shape[-1] * a[1])
    if k in ("zeropad", "pad"):
        s = list(full)
        for i in range(len(a) // 2):
            s[-1 - i] += a[2 * i] + a[2 * i + 1]
        return tuple(s[1:])
    param, dim, i = a
    s = list(full)
    s[dim] = split_sizes(k, param, s[dim])[i]
    return tuple(s[1:])


def op_shape(op, shapes: list) -> tuple:
    """The per-sample shape of ``op``'s value given the shapes of the values before it."""
    if isinstance(op, (Conv, Conv1d)):
        c, *sp = shapes[op.src]
        return (op.out,) + tuple(conv_out(n, op.kernel, op.stride, op.padding, op.dilation) for n in sp)
    if isinstance(op, ConvT):
        c, h, w = shapes[op.src]
        return (op.out,) + tuple(convt_out(n, op.kernel, op.stride, op.padding, op.output_padding, op.dilation)
                                 for n in (h, w))
    if isinstance(op, Add):
        return shapes[op.a]
    if isinstance(op, Mul):
        return broadcast(shapes[op.a], shapes[op.b])
    if isinstance(op, Pool):
        return _pool_shape(op, shapes[op.src])
    if isinstance(op, Cat):
        first = shapes[op.srcs[0]]
        d = op.dim - 1
        return first[:d] + (sum(shapes[i][d] for i in op.srcs),) + first[d + 1:]
    if isinstance(op, (Act, Passthrough, Norm, Shuffle)):
        return shapes[op.src]
    if isinstance(op, Flatten):
        return (int(np.prod(shapes[op.src])),)
    if isinstance(op, Linear):
        return tuple(shapes[op.src][:-1]) + (op.out,)
    if isinstance(op, Layout):
        return _layout_shape(op, shapes[op.src])
    if isinstance(op, Reshape):
        return reshape_shape(shapes[op.src], op.shape, shapes)
    raise TypeError(op)


def infer_shapes(g: GraphSpec) -> list:
    shapes = [tuple(g.input_shape)]
    for op in g.ops:
        shapes.append(op_shape(op, shapes))
    return shapes


def output_values(out) -> list:
    """The value indices an output structure returns, in order."""
    if not isinstance(out, Out):
        return [out]
    items = [v for _, v in out.items] if out.kind == "dict" else list(out.items)
    return [i for v in items for i in output_values(v)]


def returned(g: GraphSpec) -> list:
    """The value indices the network returns (the last value, or those of ``g.outputs``)."""
    return [len(g.ops)] if g.outputs is None else output_values(g.outputs)
