"""The graph fuzzer's extreme weights: per-layer :class:`graph_spec.Init` / :class:`graph_spec.BN`
recipes (seeded numpy draws), their hypothesis strategies and their materialization.

Per output channel a normal scale from 1e-9 to 1e3 (mixtures within a layer, one regime per
network: "mixed", "tiny", "huge"), all-zero output channels, constant channels (zero weights,
nonzero bias), BN with tiny running variances and zero gammas, affine=False.
"""

from __future__ import annotations

import numpy as np
import torch
from graph_spec import BN, Init
from hypothesis import strategies as st
from torch import nn

SCALES = (1.0, 0.1, 10.0, 1e-3, 1e3, 1e-6, 1e-9)  # weight / bias std; shrinks towards 1.0
REGIMES = {"mixed": SCALES, "tiny": (1e-3, 1e-6, 1e-9), "huge": (10.0, 1e2, 1e3)}  # per network
VARIANCES = (1.0, 0.01, 100.0, 1e-6, 1e-10)       # BN running_var scale; shrinks towards 1.0


# ----------------------------------------------------------------------------- materialization

def init_weights(init: Init, shape: tuple) -> tuple:
    """(weight, bias or None) float32 tensors of ``shape`` (output channels first) for ``init``."""
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


def set_weights(layer: nn.Module, init: Init, transposed: bool = False) -> None:
    """Fill a conv / linear from ``init`` (``transposed``: a ConvTranspose2d, weight [in, out, ...]:
    the recipe's output channels are its dim 1)."""
    shape = tuple(layer.weight.shape)
    w, b = init_weights(init, (shape[1], shape[0]) + shape[2:] if transposed else shape)
    with torch.no_grad():
        layer.weight.copy_(w.transpose(0, 1) if transposed else w)
        if layer.bias is not None:
            layer.bias.copy_(b if b is not None else torch.zeros_like(layer.bias))


def batch_norm(spec: BN, channels: int, dims: int = 2) -> nn.Module:
    """An eval BatchNorm2d (``dims`` 2) / BatchNorm1d (``dims`` 1) with the statistics of ``spec``."""
    bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(channels, affine=spec.affine)
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


# ----------------------------------------------------------------------------- strategies

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
