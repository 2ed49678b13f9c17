"""Block reconstruction: learned weight rounding per block, on distilled data only.

AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization",
Eqs. 21-25) replaces round-to-nearest of each weight by a learned choice between ``floor``
and ``floor + 1``. With ``s`` / ``z`` the weight record's (per-channel) scale and zero point
and ``[qmin, qmax]`` its code range, a continuous variable V per weight gives::

    h(V)    = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)       zeta = 1.1, gamma = -0.1
    w_soft  = s * (clamp(floor(w / s) + h(V) + z, qmin, qmax) - z)
    f_reg   = sum(1 - |2 h(V) - 1|^beta)                            beta: 20 -> 2 after a warm-up

V starts where h(V) equals the fractional part ``w / s - floor(w / s)`` (so that w_soft = w
inside the range), and the final codes are ``clamp(floor(w / s) + [V >= 0] + z, qmin, qmax)``:
exactly floor or floor + 1 (h(V) >= 1/2 iff V >= 0).

BRECQ (Li et al. 2021, "BRECQ: Pushing the Limit of Post-Training Quantization by Block
Reconstruction", Sec. 3-4) optimizes the V of all layers of one *block* together on the
block's output: ``loss = mean_{n, positions} sum_channels (Q_block(x_q) - F_block(x_fp))^2
+ lambda f_reg``, x_q the input of the block in the quantized model (earlier blocks already
reconstructed, activations quantized), x_fp the float model's. Blocks here are the spans of
the fx graph between the points where a single tensor carries everything the rest of the
model reads (after a residual add: ResNet basic blocks, MobileNetV2 inverted residuals),
a lone layer joined to the next span; or user-given groups of layers.

The result ends in the shared quantization record: each layer's float weight is replaced by
``s * (code - z)`` (float32), whose quantization by the unchanged weight record gives back
``code`` exactly, so :meth:`~pyzeroq.quantizers.QuantLayerMixin.layer_record`, the fake-quant
forward, ``to_integer``, ``export_onnx`` and ``save`` / ``load`` all carry the learned codes.

A guard needing no real data decides whether to keep them: KL(FP || quantized) on held-out
images the reconstruction did not see, before and after (``ReconstructionConfig.guard_data``:
Gaussian images by default, which predicted the test outcome better than held-out distilled
ones in bench/results/recon_summary.md: 67 vs 59 of 83 reconstructions).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from tqdm import tqdm

from .config import ReconstructionConfig
from .graph_split import Cut, cut, model_inputs, stage, tensor_nodes
from .modules import act_quants, quant_layers
from .outputs import concat_outputs, output_distance, output_leaves, resolve_measure
from .quantizers import QuantAct

__all__ = ["check_blocks", "ZETA", "GAMMA", "rectified_sigmoid", "init_rounding", "round_regularizer", "beta_at",
           "AdaRoundWeight", "find_blocks", "reconstruct", "ReconstructionResult"]

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid (Sec. 4.2)
EVAL_BATCH = 256


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), elementwise (AdaRound Eq. 23)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_rounding(frac: torch.Tensor) -> torch.Tensor:
    """V with h(V) = ``frac`` (the fractional part, in [0, 1)): ``-log((zeta - gamma) / (frac - gamma) - 1)``."""
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)


def round_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2 h - 1|^beta) (AdaRound Eq. 24): 0 when every h is 0 or 1."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_at(step: int, cfg: ReconstructionConfig) -> float | None:
    """beta of step ``step`` (0-based) of ``cfg.iters``: None during the warm-up (no regularizer),
    then linear from ``beta_start`` to ``beta_end``."""
    warm = int(cfg.warmup * cfg.iters)
    if step < warm:
        return None
    t = (step - warm) / max(cfg.iters - warm, 1)
    return cfg.beta_start + (cfg.beta_end - cfg.beta_start) * t


class AdaRoundWeight(nn.Module):
    """Stands in for a layer's ``weight_quant`` while its rounding is learned.

    weight: float32 [O, ...] the layer's weight; scale / zero_point: float32 / int64 [O] (or
    scalars) of the weight record; qmin / qmax: its code range. ``forward(weight)`` returns the
    soft-rounded weight (``hard=False``) or ``s * (codes() - z)``; :meth:`codes` gives the
    int64 codes ``clamp(floor(w / s) + [V >= 0] + z, qmin, qmax)``. It offers the attributes the
    layer reads of a quantizer (``mode``, ``effective_scale``), so the int32 bias rounding runs
    as in the calibrated model.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int):
        super().__init__()
        view = (-1,) + (1,) * (weight.dim() - 1) if scale.dim() == 1 else ()
        self.register_buffer("s", scale.detach().float().reshape(view))
        self.register_buffer("z", zero_point.detach().float().reshape(view))
        self._scale = scale.detach()
        v = weight.detach().float() / self.s  # one float32 division, as the weight record quantizes
        self.register_buffer("floor", torch.floor(v))
        self.qmin, self.qmax = float(qmin), float(qmax)
        self.v = nn.Parameter(init_rounding(v - self.floor))
        self.mode, self.hard = "quantize", False

    def effective_scale(self) -> torch.Tensor:
        return self._scale

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def codes(self) -> torch.Tensor:
        """int64 codes of the learned rounding (each exactly floor or floor + 1 before the clamp)."""
        up = (self.v.detach() >= 0).float()
        return torch.clamp(self.floor + up + self.z, self.qmin, self.qmax).to(torch.int64)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.hard:
            return self.s * (self.codes().float() - self.z)
        return self.s * (torch.clamp(self.floor + self.h() + self.z, self.qmin, self.qmax) - self.z)


@dataclass
class ReconstructionResult:
    """What :func:`reconstruct` did: ``blocks`` (layer names per block), ``block_loss`` (final
    reconstruction MSE per block on its calibration images, before / after), the guard's KL on
    held-out images before / after (None without a guard), ``kept`` and the time taken."""

    blocks: list[list[str]] = field(default_factory=list)
    block_loss: list[tuple[float, float]] = field(default_factory=list)
    flipped: list[float] = field(default_factory=list)  # per block: share of codes != round-to-nearest
    guard_kl_before: float | None = None
    guard_kl_after: float | None = None
    kept: bool = True
    seconds: float = 0.0


# ---------------------------------------------------------------------------- blocks
def check_blocks(blocks, layers: list[str]) -> list[tuple[int, int]]:
    """Spans ``(start, end)`` of user-given ``blocks`` (tuples of layer names) over ``layers``;
    ValueError naming ``reconstruction.blocks`` unless they list every layer once, in graph order."""
    flat = [n for b in blocks for n in b]
    if flat != list(layers):
        raise ValueError("reconstruction.blocks must list every quantized layer once, consecutive in graph "
                         f"order {list(layers)}; got {[list(b) for b in blocks]}")
    spans, start = [], 0
    for b in blocks:
        spans.append((start, start + len(b)))
        start += len(b)
    return spans


def _source(node: fx.Node, layer_set: set[str], tensors: frozenset[str]) -> fx.Node:
    """Walk back from ``node`` through ops with a single tensor input that are not quantized
    layers (activations, quantizers, identity shortcuts, pooling): the tensor it is a view of."""
    while not (node.op == "call_module" and node.target in layer_set):
        inputs = [a for a in node.all_input_nodes if a.name in tensors]
        if len(inputs) != 1:
            break
        node = inputs[0]
    return node


def find_blocks(gm: fx.GraphModule, layers: list[str], sample: torch.Tensor) -> list[tuple[int, int]]:
    """Spans ``(start, end)`` of ``layers`` (graph order) forming the blocks: a boundary after
    layer k-1 wherever everything the rest of the graph reads after the first k layers (the cut
    of :func:`pyzeroq.graph_split.cut`) derives from one tensor through single-input non-layer
    ops -- a residual add closed (ResNet basic blocks, MobileNetV2 inverted residuals). Spans of
    one layer join the next span (the last such span the previous one). ``sample``: one input
    batch [n, ...] (tells tensors from other values)."""
    tensors = tensor_nodes(gm, sample)
    layer_set = set(layers)
    bounds = [0]
    for k in range(1, len(layers)):
        nodes = cut(gm, layers, k, tensors).nodes
        if len({_source(n, layer_set, tensors) for n in nodes}) == 1:
            bounds.append(k)
    bounds.append(len(layers))
    merged: list[list[int]] = []
    pending = None
    for a, b in zip(bounds, bounds[1:]):
        start = a if pending is None else pending
        if b - start == 1 and b != len(layers):
            pending = start
            continue
        merged.append([start, b])
        pending = None
    if len(merged) > 1 and merged[-1][1] - merged[-1][0] == 1:
        last = merged.pop()
        merged[-1][1] = last[1]
    return [(a, b) for a, b in merged]


# ---------------------------------------------------------------------------- helpers
@contextmanager
def _float_mode(gm: nn.Module):
    """Every weight and activation quantizer off (the float model) inside; modes restored after."""
    quantizers = [layer.weight_quant for layer in quant_layers(gm).values()] + list(act_quants(gm).values())
    modes = [q.mode for q in quantizers]
    for q in quantizers:
        q.mode = "off"
    try:
        yield
    finally:
        for q, m in zip(quantizers, modes):
            q.mode = m


@torch.no_grad()
def _run(module: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``module``'s outputs (a tuple of tensors) on ``inputs`` (tensors [N, ...]), in batches."""
    n = inputs[0].shape[0]
    outs = [module(*(t[i:i + EVAL_BATCH] for t in inputs)) for i in range(0, n, EVAL_BATCH)]
    return [torch.cat([o[j] for o in outs]) for j in range(len(outs[0]))]


def _block_loss(pred: tuple, target: list[torch.Tensor]) -> torch.Tensor:
    """BRECQ's reconstruction loss: squared error summed over channels (dim 1), mean over the rest."""
    total = 0.0
    for p, t in zip(pred, target):
        d = (p - t).square()
        total = total + (d.sum(1).mean() if d.dim() > 1 else d.mean())
    return total


@torch.no_grad()
def _outputs(gm: nn.Module, data: torch.Tensor) -> list:
    return concat_outputs([output_leaves(gm(data[i:i + EVAL_BATCH])) for i in range(0, len(data), EVAL_BATCH)])


@torch.no_grad()
def float_reference(gm: nn.Module, data: torch.Tensor) -> list:
    """The float model's outputs on ``data``: ``gm`` with every quantizer off. Only while ``gm``'s
    weights are still the float ones: after :func:`reconstruct` kept its rounding they are the
    dequantized learned codes, and this would measure the quantized weights as the reference."""
    with _float_mode(gm):
        return _outputs(gm, data)


@torch.no_grad()
def guard_kl(gm: nn.Module, data: torch.Tensor, measure: str = "auto", reference: list | None = None) -> float:
    """The guard's distance of ``gm`` on ``data`` [M, ...]: KL(FP output || quantized output), mean
    over images, for a logits model (``measure`` "kl"); the variance-normalised MSE of every
    returned tensor otherwise ("mse"; "auto" picks, :mod:`pyzeroq.outputs`). ``reference``: the
    float outputs (:func:`float_reference`, taken before any reconstruction); None takes them from
    ``gm`` now, which is right only for a model whose weights were not reconstructed."""
    reference = float_reference(gm, data) if reference is None else reference
    quantized = _outputs(gm, data)
    return float(output_distance(reference, quantized, resolve_measure(reference, measure)))


# ---------------------------------------------------------------------------- one block
def _qdrop_hook(p: float, generator: torch.Generator):
    """QDrop (Wei et al. 2022, "QDrop: Randomly Dropping Quantization for Extremely Low-bit
    Post-Training Quantization", Eq. 8): during reconstruction each activation element keeps its
    float value with probability ``p`` instead of the quantized one, which flattens the loss
    landscape the rounding is fitted on and generalizes beyond the calibration images."""
    def hook(module, inputs, output):
        if not torch.is_grad_enabled():
            return output
        x = inputs[0]
        keep_float = torch.rand(x.shape, generator=generator).to(x.device) < p
        return torch.where(keep_float, x, output)
    return hook


def _optimize_block(stage_gm: nn.Module, layers: dict[str, nn.Module], q_in: list[torch.Tensor],
                    fp_out: list[torch.Tensor], cfg: ReconstructionConfig, index: int, progress: bool):
    """Learn the rounding of ``layers`` (name -> layer, all in ``stage_gm``); returns
    (loss before, loss after, share of codes flipped) and leaves hard codes in the layers' weights."""
    rounders = {}
    for name, layer in layers.items():
        wq = layer.weight_quant
        rounders[name] = AdaRoundWeight(layer.weight, wq.scale, wq.zero_point, wq.qmin, wq.qmax).to(layer.weight.device)
    originals = {name: layer.weight_quant for name, layer in layers.items()}
    for name, layer in layers.items():
        layer._modules["weight_quant"] = rounders[name]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    drop_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index + 500_000)
    hooks = [] if cfg.drop_prob == 0 else [
        q.register_forward_hook(_qdrop_hook(cfg.drop_prob, drop_gen))
        for q in stage_gm.modules() if isinstance(q, QuantAct) and q.mode == "quantize"]
    params = [r.v for r in rounders.values()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    n = q_in[0].shape[0]
    try:
        for r in rounders.values():
            r.hard = True
        before = float(_block_loss(_run(stage_gm, q_in), fp_out))
        nearest = {k: r.v.detach() >= 0 for k, r in rounders.items()}  # round to nearest (frac >= 1/2 up)
        for r in rounders.values():
            r.hard = False
        for step in tqdm(range(cfg.iters), desc=f"reconstruct block {index}", disable=not progress, leave=False):
            idx = torch.randperm(n, generator=gen)[:cfg.batch_size]
            loss = _block_loss(stage_gm(*(t[idx] for t in q_in)), [t[idx] for t in fp_out])
            beta = beta_at(step, cfg)
            if beta is not None and cfg.reg_weight > 0:
                loss = loss + cfg.reg_weight * sum(round_regularizer(r.h(), beta) for r in rounders.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for h in hooks:
            h.remove()
        hooks = []
        for r in rounders.values():
            r.hard = True
        after = float(_block_loss(_run(stage_gm, q_in), fp_out))
        flips = sum(int((nearest[k] != (r.v.detach() >= 0)).sum()) for k, r in rounders.items())
        total = sum(r.v.numel() for r in rounders.values())
        with torch.no_grad():
            for name, layer in layers.items():
                layer.weight.copy_(rounders[name](layer.weight))
    finally:
        for h in hooks:
            h.remove()
        for name, layer in layers.items():
            layer._modules["weight_quant"] = originals[name]
            originals[name]._cache = None
    return before, after, flips / max(total, 1)


# ---------------------------------------------------------------------------- entry point
def reconstruct(gm: fx.GraphModule, layers: list[str], data: torch.Tensor, cfg: ReconstructionConfig,
                holdout: torch.Tensor | None = None, progress: bool = False) -> ReconstructionResult:
    """Learn the weight rounding of the calibrated model ``gm`` block by block (module docstring).

    gm: a prepared, calibrated :class:`torch.fx.GraphModule` (weights and activations quantizing;
    changed in place: the weights of its quantized layers become their learned dequantized
    codes, or stay as they were when the guard rejects them). layers: its quantized layer names
    in graph order. data: float32 calibration images [N, ...] (the reconstruction set).
    holdout: float32 images [M, ...] for the guard (KL(FP || quantized) before vs after; the
    rounding is kept only when it lowers it), or None (always kept).
    Raises ValueError for user blocks (``cfg.blocks``) that do not list every layer once in
    graph order. Deterministic for a given ``cfg.seed``.
    """
    t0 = time.perf_counter()
    spans = check_blocks(cfg.blocks, layers) if cfg.blocks is not None else \
        find_blocks(gm, layers, data[:2])
    result = ReconstructionResult(blocks=[list(layers[a:b]) for a, b in spans])
    modules = quant_layers(gm)
    saved = {n: modules[n].weight.detach().clone() for n in layers}
    grads = {n: p.requires_grad for n, p in gm.named_parameters()}
    for p in gm.parameters():
        p.requires_grad_(False)
    if holdout is not None:  # the float outputs now: reconstruction writes its codes into the weights
        reference = float_reference(gm, holdout)
        result.guard_kl_before = guard_kl(gm, holdout, reference=reference)
    try:
        tensors = tensor_nodes(gm, data[:2])
        start: Cut = model_inputs(gm)
        fp_in, q_in = [data], [data]
        for index, (a, b) in enumerate(tqdm(spans, desc="reconstruction", disable=not progress, leave=False)):
            end = cut(gm, layers, b, tensors) if b < len(layers) else None
            block = stage(gm, start, end)
            with _float_mode(gm):
                fp_out = _run(block, fp_in)
            block_layers = {n: modules[n] for n in layers[a:b]}
            before, after, flipped = _optimize_block(block, block_layers, q_in, fp_out, cfg, index, progress)
            result.block_loss.append((before, after))
            result.flipped.append(flipped)
            q_in, fp_in, start = _run(block, q_in), fp_out, end
        if holdout is not None:
            result.guard_kl_after = guard_kl(gm, holdout, reference=reference)
            result.kept = result.guard_kl_after < result.guard_kl_before
            if not result.kept:
                with torch.no_grad():
                    for n in layers:
                        modules[n].weight.copy_(saved[n])
    finally:
        for n, p in gm.named_parameters():
            p.requires_grad_(grads[n])
    result.seconds = time.perf_counter() - t0
    if not math.isfinite(sum(a for _, a in result.block_loss)):
        raise FloatingPointError("reconstruction diverged (non-finite block loss)")
    return result


def rounding_codes(weight: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, up: np.ndarray,
                   qmin: int, qmax: int) -> np.ndarray:
    """numpy reference of :meth:`AdaRoundWeight.codes`: ``clamp(floor(w / s) + up + z, qmin, qmax)``
    per output channel (axis 0), float32 division."""
    w = np.asarray(weight, np.float32)
    shape = (-1,) + (1,) * (w.ndim - 1)
    s = np.asarray(scale, np.float32).reshape(shape)
    z = np.asarray(zero_point, np.int64).reshape(shape)
    return np.clip(np.floor(w / s).astype(np.int64) + np.asarray(up, np.int64) + z, qmin, qmax)
