"""``pyzeroq.quantize``: the ZeroQ pipeline end to end.

distill (or gaussian / real) calibration data -> fx surgery (BN folding, quantizers)
-> per-layer KL sensitivities -> Pareto choice of weight bits (+ Appendix-A grouped
refinement) -> activation-range calibration -> fake-quantized model with a report.
"""

from __future__ import annotations

import copy
import hashlib
import math
import numbers
import sys
import time
import types
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import pareto
from ._optional import require
from .config import QuantConfig
from .distill import distill_data, gaussian_inputs
from .modules import act_quants, prepare, quant_layers, set_act_mode, set_weight_bits
from .sensitivity import JointEvaluator, layer_sensitivities

FLOAT_BITS = 32
BITS_PER_BYTE = 8
CALIBRATION_BATCH = 256
# Random / Inverse (Table V) pick among configurations of the budget's size: the largest
# cost <= budget on a grid of this many bins (when QuantConfig.pareto_bins is None).
SAME_SIZE_BINS = 1000


@dataclass
class QuantReport:
    timings: dict[str, float] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    params: dict[str, int] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)
    candidates: tuple[int, ...] = ()
    sensitivity: dict[str, dict[int, float]] = field(default_factory=dict)
    frontier: dict[str, list] = field(default_factory=dict)   # cost, total sensitivity per point
    chosen: dict[str, float] = field(default_factory=dict)    # cost, budget, estimate, exact
    size_bytes: int = 0
    fp_size_bytes: int = 0
    folded_bn: dict[str, str] = field(default_factory=dict)
    float_ops: list[str] = field(default_factory=list)
    distill_loss: tuple[float, float] | None = None
    relaxation: dict | None = None

    def plot_pareto(self, path: str) -> None:
        """Draw the (size, total sensitivity) frontier with the chosen point."""
        matplotlib = require("matplotlib", "plot", "QuantReport.plot_pareto")
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.frontier:
            raise ValueError("no frontier in this report (uniform precision was requested)")
        fig, ax = plt.subplots(figsize=(6, 4))
        mb = np.asarray(self.frontier["size_bytes"]) / 1e6
        ax.step(mb, self.frontier["total_sensitivity"], where="post", label="Pareto frontier (additive)")
        ax.plot([self.chosen["size_bytes"] / 1e6], [self.chosen["estimate"]], "r*", ms=12, label="chosen")
        ax.axvline(self.chosen["budget_bytes"] / 1e6, color="gray", ls="--", label="budget")
        ax.set_xlabel("weight size (MB)")
        ax.set_ylabel("sum of sensitivities")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


class QuantizedModel(nn.Module):
    """Fake-quantized model returned by :func:`quantize`; runs in torch."""

    def __init__(self, graph_module: nn.Module, bit_widths: dict[str, int], act_bits: int | None,
                 report: QuantReport, config: QuantConfig):
        super().__init__()
        self.graph_module = graph_module
        self.bit_widths = bit_widths
        self.act_bits = act_bits
        self.report = report
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph_module(x)

    def save(self, path):
        """Write this model to ``path`` (format: :mod:`pyzeroq.io`, read with ``torch.load(weights_only=True)``);
        ``pyzeroq.load(path)`` rebuilds it bit-exactly. Returns the path."""
        from .io import save

        return save(self, path)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, but a state dict quantized with other bit widths raises
        ValueError naming the first layer that differs (and both bit widths)."""
        from .io import check_bit_widths

        check_bit_widths(self, state_dict, prefix="graph_module.")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _check_input_shape(input_shape) -> tuple[int, ...]:
    if not isinstance(input_shape, (tuple, list)) or not input_shape or \
            not all(isinstance(d, numbers.Integral) and d > 0 for d in input_shape):
        raise ValueError(f"input_shape must be a tuple of positive ints without the batch dimension, "
                         f"e.g. (1, 28, 28); got {input_shape!r}")
    return tuple(int(d) for d in input_shape)


def calibration_data(model: nn.Module, config: QuantConfig, input_shape, report: QuantReport) -> torch.Tensor:
    if config.calibration == "real":
        data = config.calibration_data
        data = torch.as_tensor(data) if not isinstance(data, torch.Tensor) else data
        if not data.is_floating_point() or data.dim() < 2:
            raise ValueError("calibration_data must be a float tensor [N, ...] in the model's input domain")
        return data[:config.num_samples].float().to(config.device)
    shape = _check_input_shape(input_shape)
    if config.calibration == "gaussian":
        return gaussian_inputs(model, (config.num_samples, *shape), torch.Generator().manual_seed(config.seed),
                               config.device)
    result = distill_data(model, shape, num_samples=config.num_samples, iters=config.distill_iters,
                          batch_size=config.distill_batch_size, lr=config.distill_lr, seed=config.seed,
                          device=config.device, progress=config.progress)
    report.distill_loss = (result.initial_loss, result.final_loss)
    return result.data


@torch.no_grad()
def _layer_macs(gm: nn.Module, sample: torch.Tensor) -> dict[str, int]:
    macs, handles = {}, []
    for name, layer in quant_layers(gm).items():
        def hook(mod, inputs, output, name=name):
            positions = output.shape[2] * output.shape[3] if output.dim() == 4 else 1
            macs[name] = int(mod.weight.numel() * positions)
        handles.append(layer.register_forward_hook(hook))
    gm(sample[:1])
    for h in handles:
        h.remove()
    return macs


def _cost_matrix(report: QuantReport, config: QuantConfig) -> tuple[np.ndarray, int]:
    """Integer cost[L, B] (bits of weights, or BOPs) divided by their gcd, and the budget in those units."""
    base = report.params if config.budget_metric == "size" else report.macs
    act = 1 if config.budget_metric == "size" else (config.act_bits or FLOAT_BITS)
    raw = np.array([[base[n] * b * act for b in report.candidates] for n in report.layers], dtype=np.int64)
    target = config.avg_weight_bits if config.mixed_precision else report.candidates[0]
    budget_raw = math.floor(sum(base[n] for n in report.layers) * target * act)
    unit = int(np.gcd.reduce(raw.ravel()))
    return raw // unit, budget_raw // unit


def _selection_key(gm: nn.Module, data: torch.Tensor, omega: np.ndarray, cost: np.ndarray, budget: int,
                   config: QuantConfig) -> str:
    """Everything the bit-width selection depends on, hashed (weights, data, sensitivities, knobs)."""
    h = hashlib.sha256()
    for arr in (omega, cost, np.array([budget])):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(data.detach().cpu().contiguous().numpy().tobytes())
    for layer in quant_layers(gm).values():
        h.update(layer.weight.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr((config.weight_candidates, config.mp_method, config.mp_relaxation, config.mp_keep_estimate,
                   config.mp_group_size, config.mp_size_bins, config.mp_keep_exact, config.mp_eval_samples,
                   config.pareto_bins, config.seed)).encode())
    return h.hexdigest()


def _same_size_choice(objective: np.ndarray, cost: np.ndarray, budget: float, bins: int) -> np.ndarray:
    """The configuration minimizing ``objective`` among those of the budget's size: the
    largest total cost <= budget reachable on a ``bins``-bin cost grid (k-best DP, k = 1).
    Without the size condition "maximize sensitivity" would just pick all-lowest bits."""
    kb = pareto.k_best(objective, cost, 1, bins=bins)
    sizes = np.where(kb.config_cost[:, 0] <= budget, kb.config_cost[:, 0], -np.inf)
    return kb.choices[int(np.argmax(sizes)), 0]


def _select(gm, data, omega, cost, budget, config, report) -> tuple[np.ndarray, float]:
    """(choice per layer, additive estimate); fills the frontier / relaxation fields of ``report``."""
    bins = config.pareto_bins
    if config.mp_method in ("random", "inverse"):
        if config.mp_method == "random":  # uniform-random scores: a random configuration
            objective = np.random.default_rng(config.seed).random(omega.shape)
        else:  # minimizing this maximizes the sum of sensitivities
            objective = omega.max() - omega
        choice = _same_size_choice(objective, cost, budget, bins or SAME_SIZE_BINS)
        return choice, float(sum(omega[i, c] for i, c in enumerate(choice)))
    choice, _ = pareto.solve(omega, cost, budget, bins=bins)
    frontier = pareto.frontier(omega, cost, bins=bins)
    report.frontier = {"cost": [int(c) for c in frontier.cost],
                       "total_sensitivity": [float(t) for t in frontier.total]}
    if config.mp_relaxation:
        evaluator = JointEvaluator(gm, report.layers, report.candidates, data[:config.mp_eval_samples])
        result = pareto.grouped_search(
            omega, cost, budget, evaluator, group_size=config.mp_group_size,
            keep_per_bin_estimate=config.mp_keep_estimate, size_bins=config.mp_size_bins,
            keep_per_bin_exact=config.mp_keep_exact, bins=bins)
        independent_kl = float(evaluator(np.asarray(choice)[None, :])[0])
        report.relaxation = {"exact_kl": float(result.total), "independent_choice_exact_kl": independent_kl,
                             "evaluations": evaluator.configurations, "batched_calls": evaluator.calls}
        # keep the plain DP choice if the grouped search found nothing better by exact KL
        if float(result.total) <= independent_kl:
            choice = np.asarray(result.choice)
        report.relaxation["kept"] = "grouped" if \
            np.array_equal(choice, np.asarray(result.choice)) else "independent"
    return np.asarray(choice), float(sum(omega[i, c] for i, c in enumerate(choice)))


_SELECTION_CACHE: OrderedDict[str, tuple] = OrderedDict()
SELECTION_CACHE_SIZE = 32


def choose_bits(gm: nn.Module, data: torch.Tensor, config: QuantConfig, report: QuantReport) -> dict[str, int]:
    """Weight bits per layer on the Pareto frontier under the size (or BOPs) budget.

    The selection is deterministic in its inputs, so it is memoized (bounded LRU): repeated
    calls with the same model, calibration data and knobs (e.g. the same weights at 4- and
    8-bit activations) skip the grouped search.
    """
    cand = report.candidates
    omega = np.array([[report.sensitivity[n][b] for b in cand] for n in report.layers])
    cost, budget = _cost_matrix(report, config)
    key = _selection_key(gm, data, omega, cost, budget, config)
    if key in _SELECTION_CACHE:
        _SELECTION_CACHE.move_to_end(key)
        choice, estimate, frontier, relaxation = _SELECTION_CACHE[key]
        report.frontier, report.relaxation = copy.deepcopy(frontier), copy.deepcopy(relaxation)
    else:
        choice, estimate = _select(gm, data, omega, cost, budget, config, report)
        _SELECTION_CACHE[key] = (choice, estimate, copy.deepcopy(report.frontier), copy.deepcopy(report.relaxation))
        if len(_SELECTION_CACHE) > SELECTION_CACHE_SIZE:
            _SELECTION_CACHE.popitem(last=False)
    unit_bytes = (report.params[report.layers[0]] * cand[0]) / cost[0, 0] / BITS_PER_BYTE \
        if config.budget_metric == "size" else None
    if unit_bytes is not None and report.frontier:
        report.frontier["size_bytes"] = [float(c * unit_bytes) for c in report.frontier["cost"]]
    chosen_cost = int(sum(cost[i, c] for i, c in enumerate(choice)))
    report.chosen = {"cost": chosen_cost, "budget": int(budget), "estimate": estimate}
    if unit_bytes is not None:
        report.chosen.update(size_bytes=float(chosen_cost * unit_bytes), budget_bytes=float(budget * unit_bytes))
    return {name: cand[int(c)] for name, c in zip(report.layers, choice)}


def quantize(model: nn.Module, config: QuantConfig | None = None, input_shape=None) -> QuantizedModel:
    """Quantize ``model`` without training data (by default) and return a fake-quantized copy.

    ``input_shape`` (without the batch dimension) is needed for distilled or Gaussian
    calibration. The given model is never modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a pyzeroq.QuantConfig, got {type(config).__name__}")
    if config.calibration != "real":
        _check_input_shape(input_shape)
    report = QuantReport(candidates=config.weight_candidates)
    torch.manual_seed(config.seed)

    t0 = time.perf_counter()
    float_model = model
    data = calibration_data(float_model, config, input_shape, report)
    report.timings[f"calibration_data ({config.calibration})"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    gm, info = prepare(float_model, config.act_bits, config.per_channel, config.percentile, config.act_range)
    gm.to(config.device)
    report.layers = list(info.layers)
    layers = quant_layers(gm)
    report.params = {n: int(layers[n].weight.numel()) for n in report.layers}
    report.macs = _layer_macs(gm, data)
    report.folded_bn, report.float_ops = dict(info.folded_bn), list(info.float_ops)
    report.timings["surgery"] = time.perf_counter() - t0
    if not report.layers:
        raise ValueError("the model has no Conv2d or Linear layer to quantize")

    if config.mixed_precision:  # uniform precision needs no sensitivities (the costly part of W8A8)
        t0 = time.perf_counter()
        names, omega = layer_sensitivities(gm, data, report.candidates, progress=config.progress)
        report.sensitivity = {n: {b: float(omega[i, j]) for j, b in enumerate(report.candidates)}
                              for i, n in enumerate(names)}
        report.timings["sensitivity"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        bit_widths = choose_bits(gm, data, config, report)
        report.timings["pareto"] = time.perf_counter() - t0
    else:
        bit_widths = {n: report.candidates[0] for n in report.layers}

    t0 = time.perf_counter()
    set_weight_bits(gm, bit_widths)
    set_act_mode(gm, "observe")
    with torch.no_grad():
        for i in range(0, len(data), CALIBRATION_BATCH):
            gm(data[i:i + CALIBRATION_BATCH])
    for q in act_quants(gm).values():
        q.freeze()
    set_act_mode(gm, "quantize" if config.act_bits is not None else "off")
    report.timings["activation_calibration"] = time.perf_counter() - t0

    report.size_bytes = int(sum(report.params[n] * bit_widths[n] for n in report.layers) / BITS_PER_BYTE
                            + sum(p.numel() for n, p in gm.named_parameters()
                                  if not (n.endswith("weight") and n.rsplit(".", 1)[0] in layers))
                            * FLOAT_BITS / BITS_PER_BYTE)
    report.fp_size_bytes = int(sum(p.numel() for p in model.parameters()) * FLOAT_BITS / BITS_PER_BYTE)
    gm.eval()
    return QuantizedModel(gm, bit_widths, config.act_bits, report, config)


class _CallableModule(types.ModuleType):
    """``pyzeroq.quantize`` names both this module and the function :func:`quantize`.
    Importing the module (``from pyzeroq.quantize import QuantizedModel``) makes Python
    bind the package attribute to the module; calling it still runs :func:`quantize`."""

    def __call__(self, *args, **kwargs):
        return quantize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
