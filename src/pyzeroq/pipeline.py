"""``pyzeroq.pipeline``: the ZeroQ pipeline end to end (``pyzeroq.quantize`` is :func:`quantize`).

validate (model copyable, floating point, fits ``input_shape`` / ``calibration_data``,
fx-traceable) -> fx surgery (BN folding, quantizers) -> calibration data (distilled,
Gaussian or real) -> per-layer KL sensitivities -> Pareto choice of weight bits
(:func:`select_bits`, with the Appendix-A grouped refinement) -> activation-range
calibration -> fake-quantized model with a report.

Nothing here keeps state between calls: the same arguments give the same model in any
process, and neither the given model nor the global torch RNG is changed.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import nn

from . import pareto
from ._checks import float_images
from ._optional import require
from .config import QuantConfig
from .distill import distill_data, gaussian_inputs
from .distill_genie import distill_genie
from .integer.support import integer_blockers
from .modules import act_quants, fit_bias_scales, prepare, quant_layers, set_act_mode, set_weight_bits
from .quantizers import QUANT_CONV_TYPES, QuantConvTranspose2d
from .reconstruct import check_blocks, reconstruct
from .sensitivity import JointEvaluator, layer_sensitivities
from .validation import (  # noqa: F401 (FloatOpsWarning, check_calibration_data: public here too)
    WORKING_DTYPE,
    FloatOpsWarning,
    _check_float_ops,
    _check_input_shape,
    _check_surgery,
    _validated_copy,
    check_calibration_data,
)

FLOAT_BITS = 32
BITS_PER_BYTE = 8
BYTES_PER_MB = 1e6
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
    sensitivity_measure: str = "kl"  # the output distance behind it ("kl" / "mse", pyzeroq.outputs)
    frontier: dict[str, list] = field(default_factory=dict)   # cost, total sensitivity per point
    chosen: dict[str, float] = field(default_factory=dict)    # cost, budget, estimate, exact
    size_bytes: int = 0
    fp_size_bytes: int = 0
    folded_bn: dict[str, str] = field(default_factory=dict)
    float_ops: list[str] = field(default_factory=list)
    distill_loss: tuple[float, float] | None = None
    relaxation: dict | None = None
    reconstruction: dict | None = None  # pyzeroq.reconstruct.ReconstructionResult as a dict
    notes: list[str] = field(default_factory=list)  # what quantize adapted (e.g. a float64 model)
    # weight scales fitted for an exact int32 bias (pyzeroq.bias): layer, channel, reason, action,
    # bias, old / new scale and zero point
    bias_adjustments: list[dict] = field(default_factory=list)

    def plot_pareto(self, path: str) -> None:
        """Draw the (size, total sensitivity) frontier with the chosen point."""
        matplotlib = require("matplotlib", "plot", "QuantReport.plot_pareto")
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.frontier:
            raise ValueError("no frontier in this report: it comes from a mixed-precision search with "
                             "mp_method='zeroq' (uniform precision, or mp_method 'random' / 'inverse', has none)")
        fig, ax = plt.subplots(figsize=(6, 4))
        if "size_bytes" in self.frontier:  # budget_metric "size": MB; "bops": the search's cost units
            scale, key, label = 1 / BYTES_PER_MB, "size_bytes", "weight size (MB)"
            chosen, budget = self.chosen["size_bytes"], self.chosen["budget_bytes"]
        else:
            scale, key, label = 1.0, "cost", "cost (bit operations / their gcd)"
            chosen, budget = self.chosen["cost"], self.chosen["budget"]
        ax.step(np.asarray(self.frontier[key]) * scale, self.frontier["total_sensitivity"], where="post",
                label="Pareto frontier (additive)")
        ax.plot([chosen * scale], [self.chosen["estimate"]], "r*", ms=12, label="chosen")
        ax.axvline(budget * scale, color="gray", ls="--", label="budget")
        ax.set_xlabel(label)
        ax.set_ylabel("sum of sensitivities")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


@dataclass(frozen=True)
class Frontier:
    """The additive Pareto frontier: total cost and sum of sensitivities per point."""
    cost: tuple[int, ...]
    total_sensitivity: tuple[float, ...]


@dataclass(frozen=True)
class Relaxation:
    """Outcome of the Appendix-A grouped search (exact KL on the first ``mp_eval_samples`` images)."""
    exact_kl: float                     # of the grouped search's best configuration
    independent_choice_exact_kl: float  # of the plain (independent) DP choice
    evaluations: int                    # configurations re-evaluated exactly
    batched_calls: int                  # batched forward calls they took
    kept: str                           # "grouped" or "independent" (the lower exact KL)


@dataclass(frozen=True)
class Selection:
    """Weight bits chosen by :func:`select_bits`: ``choice[i]`` indexes ``candidates`` for
    ``layers[i]``; ``estimate`` is the additive sum of sensitivities of that choice and
    ``budget`` the cost budget it was chosen under (units of :func:`cost_matrix`)."""
    layers: tuple[str, ...]
    candidates: tuple[int, ...]
    choice: tuple[int, ...]
    estimate: float
    budget: int
    frontier: Frontier | None = None      # None for mp_method "random" / "inverse"
    relaxation: Relaxation | None = None  # None unless mp_relaxation (and mp_method "zeroq")

    @property
    def bit_widths(self) -> dict[str, int]:
        return {name: self.candidates[c] for name, c in zip(self.layers, self.choice)}


class QuantizedModel(nn.Module):
    """Fake-quantized model returned by :func:`quantize`; runs in torch.

    ``selection`` is the :class:`Selection` behind ``bit_widths`` (None for uniform
    precision); pass it to another :func:`quantize` call of the same model, calibration
    data and selection settings to skip the search (e.g. other activation settings).

    Training mode: the wrapper takes ``graph_module``'s mode for itself and every submodule
    (:func:`quantize` hands over an eval-mode graph, so its result has ``training == False``).
    ``train()`` / ``eval()`` switch wrapper and graph together, as for any ``nn.Module``; in
    training mode the forward is the same fake quantization (BatchNorms are folded, ranges
    frozen, weight scales fixed unless ``learn_step()`` made them LSQ parameters); only
    modules such as Dropout behave differently.
    """

    def __init__(self, graph_module: nn.Module, bit_widths: dict[str, int], act_bits: int | None,
                 report: QuantReport, config: QuantConfig, selection: Selection | None = None):
        super().__init__()
        self.graph_module = graph_module
        self.bit_widths = bit_widths
        self.act_bits = act_bits
        self.report = report
        self.config = config
        self.selection = selection
        self.train(graph_module.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph_module(float_images(x))

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


# ---------------------------------------------------------------- argument validation

# ---------------------------------------------------------------- pipeline stages

def calibration_data(model: nn.Module, config: QuantConfig, input_shape=None):
    """Calibration images for ``model``: float32 [config.num_samples, *input_shape] on
    ``config.device`` and the distillation loss (initial, final), None unless distilled.

    "real" uses (the first ``num_samples`` of) ``config.calibration_data`` (see
    :func:`check_calibration_data` for its errors); "gaussian" / "distilled" need
    ``input_shape`` (no batch dimension). "distilled" runs ``config.distill_method``: ZeroQ's
    :func:`distill_data` or GENIE's :func:`distill_genie` (ValueError for an ``input_shape`` that
    is not (C, H, W)). Distillation raises NoBatchNormError (a ValueError) for a model without
    BatchNorm.
    """
    if config.calibration == "real":
        data = check_calibration_data(config.calibration_data, input_shape)
        return data[:config.num_samples].to(WORKING_DTYPE).to(config.device), None
    shape = _check_input_shape(input_shape)
    if config.calibration == "gaussian":
        return gaussian_inputs(model, (config.num_samples, *shape), torch.Generator().manual_seed(config.seed),
                               config.device), None
    common = dict(num_samples=config.num_samples, iters=config.distill_iters, batch_size=config.distill_batch_size,
                  seed=config.seed, device=config.device, progress=config.progress, relax=config.distill_relax,
                  augment=config.distill_augment)
    if config.distill_method == "genie":
        result = distill_genie(model, shape, **common)
    else:
        result = distill_data(model, shape, lr=config.distill_lr, **common)
    return result.data, (result.initial_loss, result.final_loss)


def guard_data(model: nn.Module, config: QuantConfig, input_shape=None) -> torch.Tensor | None:
    """Held-out images for the reconstruction guard (``config.reconstruction.guard_samples``; None
    when 0), from seed ``config.seed + 1`` so the reconstruction never sees them: Gaussian
    (``guard_data="gaussian"``) or distilled / Gaussian like the calibration data
    (``"distilled"``); with ``calibration="real"`` the calibration images after the first
    ``num_samples`` (None when there are none)."""
    n = config.reconstruction.guard_samples
    if n == 0:
        return None
    if config.calibration == "real":
        rest = check_calibration_data(config.calibration_data, input_shape)[config.num_samples:]
        return rest[:n].to(WORKING_DTYPE).to(config.device) if len(rest) else None
    held_out = replace(config, num_samples=n, seed=config.seed + 1, progress=False, reconstruction=None)
    if config.reconstruction.guard_data == "gaussian":  # (without the distillation options it ignores)
        held_out = replace(held_out, calibration="gaussian", distill_method="zeroq", distill_relax=0.0,
                           distill_augment=False)
    return calibration_data(model, held_out, input_shape)[0]


@torch.no_grad()
def _layer_macs(gm: nn.Module, sample: torch.Tensor) -> dict[str, int]:
    macs, handles = {}, []
    for name, layer in quant_layers(gm).items():
        def hook(mod, inputs, output, name=name):
            # outputs per weight: conv output positions; a transposed conv scatters each input pixel;
            # a Linear applies to every leading position of [N, ..., F]
            shape = inputs[0].shape if isinstance(mod, QuantConvTranspose2d) else output.shape
            positions = math.prod(shape[2:]) if isinstance(mod, QUANT_CONV_TYPES) else math.prod(shape[1:-1])
            macs[name] = int(mod.weight.numel() * positions)
        handles.append(layer.register_forward_hook(hook))
    gm(sample[:1])
    for h in handles:
        h.remove()
    return macs


def cost_matrix(report: QuantReport, config: QuantConfig) -> tuple[np.ndarray, int]:
    """Integer cost[L, B] (int64: bits of weights, or BOPs, of layer ``report.layers[i]`` at
    ``report.candidates[b]``) divided by their gcd, and the budget in those units."""
    base = report.params if config.budget_metric == "size" else report.macs
    act = 1 if config.budget_metric == "size" else (config.act_bits or FLOAT_BITS)
    raw = np.array([[base[n] * b * act for b in report.candidates] for n in report.layers], dtype=np.int64)
    target = config.avg_weight_bits if config.mixed_precision else report.candidates[0]
    budget_raw = math.floor(sum(base[n] for n in report.layers) * target * act)
    unit = int(np.gcd.reduce(raw.ravel()))
    return raw // unit, budget_raw // unit


def _same_size_choice(objective: np.ndarray, cost: np.ndarray, budget: float, bins: int) -> np.ndarray:
    """The configuration minimizing ``objective`` among those of the budget's size: the
    largest total cost <= budget reachable on a ``bins``-bin cost grid (k-best DP, k = 1).
    Without the size condition "maximize sensitivity" would just pick all-lowest bits."""
    kb = pareto.k_best(objective, cost, 1, bins=bins)
    sizes = np.where(kb.config_cost[:, 0] <= budget, kb.config_cost[:, 0], -np.inf)
    return kb.choices[int(np.argmax(sizes)), 0]


def _grouped_refinement(gm, layers, data, sensitivity, cost, budget, choice, config):
    """Appendix-A grouped search; (choice with the lower exact KL, :class:`Relaxation`)."""
    with JointEvaluator(gm, list(layers), config.weight_candidates, data[:config.mp_eval_samples],
                        progress=config.progress, measure=config.sensitivity,
                        dtype=getattr(torch, config.mp_eval_dtype), act_quant=config.sensitivity_act_quant) as evaluator:
        result = pareto.grouped_search(
            sensitivity, cost, budget, evaluator, group_size=config.mp_group_size,
            keep_per_bin_estimate=config.mp_keep_estimate, size_bins=config.mp_size_bins,
            keep_per_bin_exact=config.mp_keep_exact, bins=config.pareto_bins, pass_decided=True)
        independent_kl = float(evaluator(np.asarray(choice)[None, :])[0])
    grouped = np.asarray(result.choice)
    # keep the plain DP choice if the grouped search found nothing better by exact KL
    if float(result.total) <= independent_kl:
        choice = grouped
    kept = "grouped" if np.array_equal(choice, grouped) else "independent"
    return np.asarray(choice), Relaxation(float(result.total), independent_kl, evaluator.configurations,
                                          evaluator.calls, kept)


def select_bits(gm: nn.Module, layers, data: torch.Tensor, sensitivity: np.ndarray, cost: np.ndarray,
                budget: int, config: QuantConfig) -> Selection:
    """Weight bits per layer on the Pareto frontier under ``budget`` (ZeroQ Eq. 4).

    gm: the prepared model (:func:`pyzeroq.modules.prepare`); layers: its quantized layer
    names (L, graph order); data: float calibration images [N, ...] (the first
    ``config.mp_eval_samples`` feed the exact re-evaluation); sensitivity: float64 [L, B]
    and cost: int64 [L, B] over ``config.weight_candidates`` (B); budget: in cost units.
    ``config.mp_method`` "random" / "inverse" pick a budget-sized configuration (Table V).

    A pure function of its inputs: nothing is cached or reported here. Side effect: the
    grouped search leaves gm's weights unquantized and its activation quantizers off.
    Raises ValueError when the matrix shapes do not match ``layers`` x candidates.
    """
    layers, cand = tuple(layers), config.weight_candidates
    sensitivity, cost = np.asarray(sensitivity, dtype=np.float64), np.asarray(cost)
    if sensitivity.shape != (len(layers), len(cand)) or cost.shape != sensitivity.shape:
        raise ValueError(f"sensitivity {sensitivity.shape} and cost {cost.shape} must both be "
                         f"[layers, candidates] = {(len(layers), len(cand))}")
    bins, frontier, relaxation = config.pareto_bins, None, None
    if config.mp_method in ("random", "inverse"):
        if config.mp_method == "random":  # uniform-random scores: a random configuration
            objective = np.random.default_rng(config.seed).random(sensitivity.shape)
        else:  # minimizing this maximizes the sum of sensitivities
            objective = sensitivity.max() - sensitivity
        choice = _same_size_choice(objective, cost, budget, bins or SAME_SIZE_BINS)
    else:
        choice, _ = pareto.solve(sensitivity, cost, budget, bins=bins)
        front = pareto.frontier(sensitivity, cost, bins=bins)
        frontier = Frontier(tuple(int(c) for c in front.cost), tuple(float(t) for t in front.total))
        if config.mp_relaxation:
            choice, relaxation = _grouped_refinement(gm, layers, data, sensitivity, cost, budget, choice, config)
    choice = tuple(int(c) for c in np.asarray(choice))
    estimate = float(sum(sensitivity[i, c] for i, c in enumerate(choice)))
    return Selection(layers, cand, choice, estimate, int(budget), frontier, relaxation)


def _record_selection(report: QuantReport, selection: Selection, cost: np.ndarray, config: QuantConfig) -> None:
    """Fill the report's frontier / relaxation / chosen fields from ``selection``."""
    cand = report.candidates
    unit_bytes = (report.params[report.layers[0]] * cand[0]) / cost[0, 0] / BITS_PER_BYTE \
        if config.budget_metric == "size" else None
    if selection.frontier is not None:
        report.frontier = {"cost": list(selection.frontier.cost),
                           "total_sensitivity": list(selection.frontier.total_sensitivity)}
        if unit_bytes is not None:
            report.frontier["size_bytes"] = [float(c * unit_bytes) for c in selection.frontier.cost]
    report.relaxation = asdict(selection.relaxation) if selection.relaxation is not None else None
    chosen_cost = int(sum(cost[i, c] for i, c in enumerate(selection.choice)))
    report.chosen = {"cost": chosen_cost, "budget": selection.budget, "estimate": selection.estimate}
    if unit_bytes is not None:
        report.chosen.update(size_bytes=float(chosen_cost * unit_bytes),
                             budget_bytes=float(selection.budget * unit_bytes))


def _check_search_inputs(report: QuantReport, config: QuantConfig, selection: Selection | None) -> None:
    """Before any costly stage: a given selection's cost budget, and a DP that fits ``pareto_bins``."""
    cost, budget = cost_matrix(report, config)
    if selection is not None and selection.budget != budget:
        raise ValueError(f"selection was made under another cost budget ({selection.budget} vs {budget} units of "
                         f"{config.budget_metric}: another avg_weight_bits, budget_metric or act_bits); pass the "
                         "selection of a quantize call with the same model and config")
    if selection is not None:  # a Selection built or edited by hand: its choice must be one quantize could make
        choice = tuple(selection.choice)
        if len(choice) != len(report.layers) or not all(
                isinstance(c, (int, np.integer)) and 0 <= c < len(report.candidates) for c in choice):
            raise ValueError(f"selection.choice must hold one index into {report.candidates} per layer "
                             f"({len(report.layers)}), got {choice!r}")
        chosen = int(sum(cost[i, c] for i, c in enumerate(choice)))
        if chosen > budget:
            raise ValueError(f"selection.choice costs {chosen} units of {config.budget_metric}, over the budget "
                             f"{budget} (avg_weight_bits={config.avg_weight_bits})")
    try:
        pareto.check_dp_size(cost, config.pareto_bins, budget)
    except ValueError as exc:
        raise ValueError(f"pareto_bins={config.pareto_bins!r}: {exc}") from None


def _mixed_precision(gm, data, config: QuantConfig, report: QuantReport, selection: Selection | None):
    """Sensitivities, then the given or a new :class:`Selection`; fills the report."""
    t0 = time.perf_counter()
    if config.sensitivity_act_quant:  # activation-aware: ranges from the largest candidate's weights
        _calibrate_activations(gm, data, {n: report.candidates[-1] for n in report.layers}, config)
    names, omega = layer_sensitivities(gm, data, report.candidates, progress=config.progress,
                                       measure=report.sensitivity_measure, act_quant=config.sensitivity_act_quant)
    report.sensitivity = {n: {b: float(omega[i, j]) for j, b in enumerate(report.candidates)}
                          for i, n in enumerate(names)}
    report.timings["sensitivity"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    omega = np.array([[report.sensitivity[n][b] for b in report.candidates] for n in report.layers])
    cost, budget = cost_matrix(report, config)
    if selection is None:  # a given one was checked after the surgery (layers, budget, choice)
        selection = select_bits(gm, report.layers, data, omega, cost, budget, config)
    _record_selection(report, selection, cost, config)
    report.timings["pareto"] = time.perf_counter() - t0
    return selection


def _first_layer_input_bits(gm: nn.Module, first: str, config: QuantConfig) -> None:
    """``first_last_bits``: the first layer's input (the image) at max(act_bits, first_last_bits)
    bits -- the 8-bit input of the AdaRound / BRECQ / GENIE protocol (they leave the image
    unquantized; an integer model needs it quantized, and 8-bit pixels are what it is fed)."""
    quant = quant_layers(gm)[first].input_quant
    if quant is not None and quant.bits is not None:
        quant.bits = max(quant.bits, config.first_last_bits)


def _calibrate_activations(gm: nn.Module, data: torch.Tensor, bit_widths: dict[str, int],
                           config: QuantConfig) -> None:
    set_weight_bits(gm, bit_widths)
    set_act_mode(gm, "observe")
    with torch.no_grad():
        for i in range(0, len(data), CALIBRATION_BATCH):
            gm(data[i:i + CALIBRATION_BATCH])
    for q in act_quants(gm).values():
        q.freeze()
    set_act_mode(gm, "quantize" if config.act_bits is not None else "off")


def _size_bytes(gm: nn.Module, report: QuantReport, bit_widths: dict[str, int]) -> int:
    """Quantized weights at their bits plus every other parameter in float32."""
    layers = quant_layers(gm)
    other = sum(p.numel() for n, p in gm.named_parameters()
                if not (n.endswith("weight") and n.rsplit(".", 1)[0] in layers))
    return int(sum(report.params[n] * bit_widths[n] for n in report.layers) / BITS_PER_BYTE
               + other * FLOAT_BITS / BITS_PER_BYTE)


def _run(model, work, config: QuantConfig, shape, selection, report: QuantReport) -> QuantizedModel:
    t0 = time.perf_counter()
    gm, info = prepare(work, config.act_bits, config.per_channel, config.percentile, config.act_range,
                       weight_format=config.weight_format, act_format=config.act_format)
    gm.to(config.device)
    sample = _check_surgery(work, gm, config, shape)
    for layer in quant_layers(gm).values():
        layer.weight_quant.weight_range = config.weight_range
    report.layers = list(info.layers)
    if not report.layers:
        raise ValueError("the model has no Conv2d or Linear layer to quantize")
    if selection is not None and selection.layers != tuple(report.layers):
        raise ValueError("selection was made for another model (its layer names differ)")
    if config.reconstruction is not None and config.reconstruction.blocks is not None:
        check_blocks(config.reconstruction.blocks, report.layers)  # before any costly stage
    layers = quant_layers(gm)
    report.params = {n: int(layers[n].weight.numel()) for n in report.layers}
    report.folded_bn = dict(info.folded_bn)
    report.float_ops = list(info.float_ops) + integer_blockers(gm, sample)
    if info.shared_layers:
        report.notes.append(f"layer module(s) called more than once run as one copy per call (own quantizers; the "
                            f"weights are stored per call): {info.shared_layers}")
    if info.bn_as_conv:
        report.notes.append(f"BatchNorm(s) {info.bn_as_conv} follow no conv / linear: each runs as the depthwise 1x1 "
                            "conv of its affine map (a quantized layer)")
    _check_float_ops(report.float_ops, config.float_ops)
    report.macs = _layer_macs(gm, sample)
    if config.mixed_precision:
        _check_search_inputs(report, config, selection)
    report.timings["surgery"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    data, report.distill_loss = calibration_data(work, config, shape)
    report.timings[f"calibration_data ({config.calibration})"] = time.perf_counter() - t0

    if config.mixed_precision:  # uniform precision needs no sensitivities (the costly part of W8A8)
        selection = _mixed_precision(gm, data, config, report, selection)
        bit_widths = selection.bit_widths
    else:
        bit_widths = {n: report.candidates[0] for n in report.layers}
        if config.first_last_bits is not None:  # the protocol of AdaRound / BRECQ / GENIE tables
            bit_widths[report.layers[0]] = bit_widths[report.layers[-1]] = config.first_last_bits
            _first_layer_input_bits(gm, report.layers[0], config)

    t0 = time.perf_counter()
    _calibrate_activations(gm, data, bit_widths, config)
    report.bias_adjustments = fit_bias_scales(gm, config.bias_overflow)
    report.timings["activation_calibration"] = time.perf_counter() - t0
    if config.reconstruction is not None:
        _reconstruct(work, gm, data, shape, config, report)
    report.size_bytes = _size_bytes(gm, report, bit_widths)
    report.fp_size_bytes = int(sum(p.numel() for p in model.parameters()) * FLOAT_BITS / BITS_PER_BYTE)
    gm.eval()
    return QuantizedModel(gm, bit_widths, config.act_bits, report, config, selection)


def _reconstruct(work: nn.Module, gm: nn.Module, data: torch.Tensor, shape, config: QuantConfig,
                 report: QuantReport) -> None:
    """Block reconstruction of the weight rounding (:mod:`pyzeroq.reconstruct`) with its guard;
    fills ``report.reconstruction`` and the timings."""
    t0 = time.perf_counter()
    holdout = guard_data(work, config, shape)
    report.timings["guard_data"] = time.perf_counter() - t0
    result = reconstruct(gm, report.layers, data, config.reconstruction, holdout, progress=config.progress)
    report.reconstruction = asdict(result)
    report.timings["reconstruction"] = result.seconds
    if not result.kept:
        report.notes.append(f"reconstruction rejected by its guard (held-out KL {result.guard_kl_after:.4g} >= "
                            f"{result.guard_kl_before:.4g} before): the round-to-nearest weights are kept")


@contextmanager
def _seeded_rng(seed: int, device: str):
    """Seed the CPU (and ``device``'s CUDA) RNG with ``seed`` inside a fork of it: the
    caller's RNG state comes back on exit."""
    dev = torch.device(device)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def quantize(model: nn.Module, config: QuantConfig | None = None, input_shape=None, *,
             selection: Selection | None = None) -> QuantizedModel:
    """Quantize ``model`` without training data (by default) and return a fake-quantized copy.

    model: an fx-traceable ``nn.Module`` with floating-point parameters (float64 / float16
    models are quantized as a float32 copy, noted in ``report.notes``), taking float images.
    input_shape: one sample's shape without the batch dimension, e.g. (1, 28, 28); needed
    for distilled or Gaussian calibration, checked against ``calibration_data`` otherwise.
    selection: a :class:`Selection` (``QuantizedModel.selection``) from an earlier call with
    the same model, calibration data and selection settings; skips the bit-width search.

    Everything cheap is checked before distillation: TypeError / ValueError naming
    ``model`` (not deep-copyable: the attribute path; non-float parameters; a parameter or
    buffer holding NaN / Inf: its name; not fx-traceable), ``config`` (``config.device`` not
    on this machine), ``input_shape`` or ``calibration_data`` (with the model's
    own error when a forward pass on that shape fails). The given model, its training
    flag and the global torch RNG are left unchanged; the same arguments give bit-identical
    results in any process.
    """
    config = QuantConfig() if config is None else config
    if isinstance(model, QuantizedModel):
        raise ValueError("model is already quantized (a pyzeroq QuantizedModel): pass the float model")
    t0 = time.perf_counter()
    notes: list[str] = []
    work, shape, measure = _validated_copy(model, config, input_shape, selection, notes)
    report = QuantReport(candidates=config.weight_candidates, notes=notes, sensitivity_measure=measure)
    report.timings["validation"] = time.perf_counter() - t0
    with _seeded_rng(config.seed, config.device):
        return _run(model, work, config, shape, selection, report)
