"""QuantConfig: every knob of ``pyzeroq.quantize``, validated on construction."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from .qspec import MAX_BITS, MIN_BITS, CodeFormat

CALIBRATIONS = ("distilled", "gaussian", "real")
DISTILL_METHODS = ("zeroq", "genie")
GUARD_DATA = ("gaussian", "distilled")  # ReconstructionConfig.guard_data
DISTILL_OPTIONS = ("distill_method", "distill_relax", "distill_augment")  # they shape distilled images only
MP_METHODS = ("zeroq", "random", "inverse")
MP_EVAL_DTYPES = ("float32", "float64")  # the grouped search's exact re-evaluation
BUDGET_METRICS = ("size", "bops")
ACT_RANGES = ("minmax", "mse")
WEIGHT_RANGES = ("minmax", "mse")
BIAS_OVERFLOW_MODES = ("enlarge", "error", "clip")
FLOAT_OPS_MODES = ("error", "warn", "allow")
SENSITIVITY_MEASURES = ("auto", "kl", "mse")  # pyzeroq.outputs
SCHEMES = ("asymmetric", "symmetric")
ACT_DTYPES = ("uint8", "int8")
DEFAULT_FORMAT = {"weight_scheme": "asymmetric", "act_dtype": "uint8", "act_scheme": "asymmetric"}
# deployment presets (QuantConfig.target): the code formats each runtime's int8 path expects
TARGETS = {
    # onnxruntime quantize_static defaults (QuantType.QInt8 both, WeightSymmetric for int8 weights,
    # ActivationSymmetric False): S8S8, weights in [-127, 127]
    "onnxruntime": {"weight_scheme": "symmetric", "act_dtype": "int8", "act_scheme": "asymmetric"},
    # TFLite int8 quantization spec: int8 asymmetric activations, symmetric per-channel int8
    # weights with zero point 0 in [-127, 127], int32 bias
    "tflite": {"weight_scheme": "symmetric", "act_dtype": "int8", "act_scheme": "asymmetric"},
    # TensorRT explicit quantization: symmetric int8 everywhere (zero point 0)
    "tensorrt": {"weight_scheme": "symmetric", "act_dtype": "int8", "act_scheme": "symmetric"},
}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_bits(name: str, v) -> None:
    if not _is_int(v) or not MIN_BITS <= v <= MAX_BITS:
        raise ValueError(f"{name} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {v!r}")


MAX_COUNT = 2**31 - 1  # counts (samples, iterations, bins...): what the loops and progress bars take
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range


def _positive_int(name: str, v) -> None:
    if not _is_int(v) or not 1 <= v <= MAX_COUNT:
        raise ValueError(f"{name} must be a positive integer up to {MAX_COUNT}, got {v!r}")


def _positive_real(name: str, v) -> None:
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")


@dataclass(frozen=True)
class ReconstructionConfig:
    """Block reconstruction of the weight rounding (``QuantConfig(reconstruction=...)``;
    :mod:`pyzeroq.reconstruct`): AdaRound's learned rounding (Nagel et al. 2020, "Up or Down?
    Adaptive Rounding for Post-Training Quantization") optimized per block on the block-output
    MSE of BRECQ (Li et al. 2021, "BRECQ: Pushing the Limit of Post-Training Quantization by
    Block Reconstruction"), on the calibration images only.

    iters: Adam steps per block. lr: Adam learning rate of the rounding variables V (1e-3, as
        AdaRound / BRECQ; on distilled data larger rates fit the calibration images better and the
        test set worse: ResNet-20 W3A4 86.5 / 84.0 / 81.5 % at 1e-3 / 3e-3 / 1e-2, 2,000 test images).
    reg_weight: lambda of the rounding regularizer ``sum(1 - |2 h(V) - 1|^beta)``.
    beta_start, beta_end: beta annealed linearly from ``beta_start`` to ``beta_end`` after
        ``warmup`` (fraction of ``iters`` without the regularizer), as AdaRound (20 -> 2, 0.2).
    batch_size: images per step (drawn from the calibration images with a generator seeded by
        ``seed`` and the block index). seed: every random step of the reconstruction.
    blocks: None (residual blocks / inverted residuals found in the fx graph: the spans between
        the points where one tensor carries everything the rest of the model reads), or a tuple
        of blocks, each a tuple of quantized layer names (consecutive in graph order, together
        every layer once): user-given boundaries.
    guard_samples: held-out images (seed ``QuantConfig.seed + 1``, never seen by the
        reconstruction) on which the guard compares KL(FP || quantized) before and after; the
        reconstructed weights are kept only when it is lower. 0: no guard (always keep).
    guard_data: the guard's images without real data: "gaussian" (default: N(0, 1) in the
        model's normalized domain) or "distilled" (held-out distilled images, like the calibration
        set). Both compare with the float model's outputs taken before the reconstruction. On
        17 reconstructions on GENIE images (ResNet-20 / MobileNetV2, W4-W2 A4, 3 seeds;
        bench/results/recon_<model>_genie_guardfix.md) the Gaussian KL went with the higher test
        top-1 in 11 and dropped a +9.8-point reconstruction; the reconstruction itself was better
        in 15 (README, "Recommended below 4-bit weights": ``guard_samples=0`` there). With
        ``calibration="real"`` the real images after the first ``num_samples`` are used whatever
        this says.
    drop_prob: QDrop (Wei et al. 2022): during the optimization each activation element of the
        block keeps its float value with this probability (0: always quantized, BRECQ; 1: the
        rounding is fitted with float activations inside the block, AdaRound's weight-only setting).
    """

    iters: int = 1000
    lr: float = 1e-3
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    batch_size: int = 32
    seed: int = 0
    blocks: tuple[tuple[str, ...], ...] | None = None
    guard_samples: int = 32
    drop_prob: float = 0.0
    guard_data: str = "gaussian"

    def __post_init__(self):
        _positive_int("reconstruction.iters", self.iters)
        _positive_int("reconstruction.batch_size", self.batch_size)
        _positive_real("reconstruction.lr", self.lr)
        _positive_real("reconstruction.beta_start", self.beta_start)
        _positive_real("reconstruction.beta_end", self.beta_end)
        if not isinstance(self.reg_weight, numbers.Real) or isinstance(self.reg_weight, bool) \
                or not math.isfinite(self.reg_weight) or self.reg_weight < 0:
            raise ValueError(f"reconstruction.reg_weight must be a finite number >= 0, got {self.reg_weight!r}")
        if not isinstance(self.warmup, numbers.Real) or isinstance(self.warmup, bool) or not 0 <= self.warmup < 1:
            raise ValueError(f"reconstruction.warmup must be in [0, 1), got {self.warmup!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"reconstruction.seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")
        if not isinstance(self.drop_prob, numbers.Real) or isinstance(self.drop_prob, bool) \
                or not 0 <= self.drop_prob <= 1:
            raise ValueError(f"reconstruction.drop_prob must be in [0, 1], got {self.drop_prob!r}")
        if self.guard_data not in GUARD_DATA:
            raise ValueError(f"reconstruction.guard_data must be one of {GUARD_DATA}, got {self.guard_data!r}")
        if not _is_int(self.guard_samples) or not 0 <= self.guard_samples <= MAX_COUNT:
            raise ValueError(f"reconstruction.guard_samples must be an integer in [0, {MAX_COUNT}], "
                             f"got {self.guard_samples!r}")
        if self.blocks is not None:
            if not isinstance(self.blocks, (list, tuple)) or not self.blocks or any(
                    not isinstance(b, (list, tuple)) or not b or not all(isinstance(n, str) for n in b)
                    for b in self.blocks):
                raise ValueError("reconstruction.blocks must be None or a non-empty tuple of non-empty tuples "
                                 f"of layer names, got {self.blocks!r}")
            object.__setattr__(self, "blocks", tuple(tuple(b) for b in self.blocks))


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model.

    weight_bits: one bit width (uniform), or a tuple of candidates for mixed precision
        (then ``avg_weight_bits`` sets the size budget: the size of the uniform model at
        that many bits; ``avg_weight_bits=4`` with candidates (2, 4, 8) is "MP4").
    act_bits: activation bits (per tensor), or None to keep activations in float.
    calibration: "distilled" (ZeroQ, default), "gaussian" (N(0, 1) after the model's
        normalization) or "real" (``calibration_data``: float images [N, C, H, W] in the
        model's input domain).
    num_samples, distill_iters, distill_batch_size, distill_lr: distilled-data settings.
    per_channel: weights per output channel (True) or per tensor.
    percentile: clip activation ranges to the [100 - p, p] percentiles (None: min/max).
    act_range: "minmax" (the observed range, or its percentiles) or "mse" (the range
        [a * min, a * max], a in 0.01..1, whose fake quantization of the calibration
        activations has the least squared error; not combinable with ``percentile``).
    mp_method: "zeroq" (min total sensitivity), "random" (a random configuration within
        budget, seeded), "inverse" (max total sensitivity within budget) — Table V ablation.
    mp_relaxation: refine the independent-sensitivity Pareto choice with the grouped
        search of the paper's Appendix A, whose four hyperparameters ("typically 10, 5,
        200, 5") map to ``mp_keep_estimate`` (configurations kept per size bin by the
        additive estimate), ``mp_group_size`` (consecutive layers per group),
        ``mp_size_bins`` (size intervals up to the budget) and ``mp_keep_exact``
        (configurations kept per bin after exact re-evaluation).
    mp_eval_samples: calibration images used for the exact re-evaluation of the grouped
        search (its cost is bins x candidates forward passes per group); None: all. Default
        16, not the reference code's 8: with 8 the chosen model's top-1 moved by up to 0.22 pp
        across distillation seeds, with 16 by at most 0.14 (bench/results/mp_stability.md).
    mp_eval_dtype: "float32" (default) or "float64", the float type of that re-evaluation
        (bench/results/mp_stability.md measures both).
    budget_metric: "size" (parameters x bits) or "bops" (MACs x weight bits x act bits).
    pareto_bins: cost grid of the exact DP (None: exact integer costs).
    seed: every random step (distillation init, random MP) derives from it.
    device: torch device for distillation and evaluation ("cpu" or e.g. "cuda").
    bias_overflow: what happens when a channel's int32 bias code (at step input scale x
        weight scale) would not fit int32 with room for the accumulation (tiny weights, large
        bias; :mod:`pyzeroq.bias`): "enlarge" (that channel's weight scale grows just enough,
        listed in ``report.bias_adjustments``), "error" (ValueError naming the layer and
        channel) or "clip" (the bias saturates at int32, with a warning and a report entry).
    sensitivity: the output distance of mixed precision (sensitivities and the grouped search;
        :mod:`pyzeroq.outputs`): "kl" (ZeroQ Eq. 2, on one logits tensor [N, classes]), "mse"
        (squared error of every returned tensor over its variance, summed: segmentation maps,
        tuples, dicts, detection heads) or "auto" (default: "kl" for logits, else "mse").
    weight_scheme: "asymmetric" (default: unsigned codes, scale and zero point per channel from
        [min, max]) or "symmetric" (signed codes in the narrow range [-(2^(b-1) - 1), 2^(b-1) - 1],
        zero point 0, scale max|w| / (2^(b-1) - 1): TFLite / TensorRT / onnxruntime S8S8 weights).
    act_dtype: "uint8" (default) or "int8": the signedness of activation codes (any ``act_bits``:
        codes in [0, 2^b - 1] or [-2^(b-1), 2^(b-1) - 1]). Asymmetric int8 activations have the
        same scales and real values as uint8 ones (zero points shifted by 2^(b-1)).
    act_scheme: "asymmetric" (default) or "symmetric" (scale max|x| / (2^(b-1) - 1), zero point 0
        for int8, 2^(b-1) for uint8: TensorRT's activations).
    target: None, or a deployment preset that sets the three above ("onnxruntime" and "tflite":
        symmetric weights, asymmetric int8 activations; "tensorrt": symmetric weights and
        activations; :data:`TARGETS`). A field given explicitly must agree with the preset.
    weight_range: "minmax" (default: each channel's [min, max]) or "mse" (per channel the range
        [a * min, a * max], a in 0.01..1, whose fake quantization of the weights has the least
        squared error: :func:`pyzeroq.quantizers.mse_weight_range`; AdaRound / BRECQ's grid).
    reconstruction: None (default) or a :class:`ReconstructionConfig`: learn the weight rounding
        block by block on the calibration images (:mod:`pyzeroq.reconstruct`); the learned codes
        are the layers' weight codes (``to_integer`` / ``export_onnx`` use them unchanged).
    sensitivity_act_quant: measure the mixed-precision sensitivities with the activations
        quantized at ``act_bits`` (ranges calibrated on the calibration images with the weights
        at the largest candidate) instead of float: Omega_i(k) = KL(FP || layer i at k bits,
        activations quantized); the exact re-evaluation of the grouped search (``mp_relaxation``)
        then runs with the activations quantized too. Needs ``act_bits``.
    distill_relax: DSG's slack (Zhang et al. 2021, "Diversifying Sample Generation for Accurate
        Data-Free Quantization", Sec. 3.2): each distilled image matches its own BN targets, the
        running mean / std moved by ``distill_relax`` x running std x N(0, 1) per sample and
        channel (and the std target clamped > 0), instead of the same targets for all; 0: ZeroQ.
    distill_augment: random circular shifts (up to 2 pixels) and horizontal flips of the
        images at every distillation step (DeepInversion, Yin et al. 2020, "Dreaming to
        Distill"), seeded like the rest.
    distill_method: how ``calibration="distilled"`` makes its images (also the reconstruction
        guard's): "zeroq" (default: optimize the pixels, :func:`pyzeroq.distill.distill_data`) or
        "genie" (a small generator and per-sample latents trained jointly on the same loss, Jeon
        et al. 2023, "Genie: Show Me the Data for Quantization", Sec. 3.1-3.2:
        :func:`pyzeroq.distill_genie.distill_genie`; image inputs (C, H, W) only). Both use
        ``num_samples``, ``distill_iters``, ``distill_batch_size``, ``seed``, ``distill_relax`` and
        ``distill_augment``; ``distill_lr`` is ZeroQ's pixel learning rate: "genie" trains with
        GENIE's own rates, and a ``distill_lr`` other than the default raises ValueError with it.
    first_last_bits: None (default: every layer at ``weight_bits``) or the weight bits of the first
        and the last quantized layer (graph order) of a uniform model, and the bits of the first
        layer's input (the image) when that is lower: the protocol of the low-bit tables of
        AdaRound, BRECQ and GENIE, which keep both layers at 8 bits and the image unquantized
        (8-bit here, as an integer model is fed). ``report.size_bytes`` counts it.
    float_ops: what ``quantize`` does with ops it cannot quantize (they would stay float, and a
        conv / linear after them would read a float input): "error" (default: a ValueError
        listing every such op, raised before any costly stage; README "Supported operators"),
        "warn" (a :class:`pyzeroq.pipeline.FloatOpsWarning`, the ops listed in
        ``report.float_ops``; ``to_integer`` / ``export_onnx`` refuse the model) or "allow"
        (silently listed in ``report.float_ops``).
    """

    weight_bits: int | tuple[int, ...] = 8
    act_bits: int | None = 8
    avg_weight_bits: float | None = None
    calibration: str = "distilled"
    calibration_data: Any = field(default=None, repr=False, compare=False)
    num_samples: int = 32
    distill_iters: int = 500
    distill_batch_size: int = 32
    distill_lr: float = 0.5
    per_channel: bool = True
    percentile: float | None = None
    act_range: str = "minmax"
    mp_method: str = "zeroq"
    mp_relaxation: bool = True
    mp_keep_estimate: int = 10
    mp_group_size: int = 5
    mp_size_bins: int = 200
    mp_keep_exact: int = 5
    mp_eval_samples: int | None = 16
    mp_eval_dtype: str = "float32"
    budget_metric: str = "size"
    pareto_bins: int | None = None
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    bias_overflow: str = "enlarge"
    sensitivity: str = "auto"
    float_ops: str = "error"
    weight_scheme: str | None = None
    act_dtype: str | None = None
    act_scheme: str | None = None
    target: str | None = None
    weight_range: str = "minmax"
    reconstruction: ReconstructionConfig | None = None
    sensitivity_act_quant: bool = False
    distill_relax: float = 0.0
    distill_augment: bool = False
    distill_method: str = "zeroq"
    first_last_bits: int | None = None

    def __post_init__(self):
        wb = self.weight_bits
        if isinstance(wb, (list, tuple)):
            if len(wb) == 0:
                raise ValueError("weight_bits must not be empty")
            for b in wb:
                _check_bits("weight_bits", b)
            if len(set(wb)) != len(wb):
                raise ValueError(f"weight_bits has duplicates: {wb!r}")
            object.__setattr__(self, "weight_bits", tuple(sorted(int(b) for b in wb)))
        else:
            _check_bits("weight_bits", wb)
        if self.act_bits is not None:
            _check_bits("act_bits", self.act_bits)
        candidates = self.weight_candidates
        if len(candidates) > 1:
            if self.avg_weight_bits is None:
                raise ValueError("avg_weight_bits is required when weight_bits lists several candidates")
            if not isinstance(self.avg_weight_bits, numbers.Real) or isinstance(self.avg_weight_bits, bool) or \
                    not candidates[0] <= self.avg_weight_bits <= candidates[-1]:
                raise ValueError(f"avg_weight_bits must lie within the candidate range "
                                 f"[{candidates[0]}, {candidates[-1]}], got {self.avg_weight_bits!r}")
        elif self.avg_weight_bits is not None and self.avg_weight_bits != candidates[0]:
            raise ValueError(f"avg_weight_bits={self.avg_weight_bits!r} needs several weight_bits candidates")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if self.calibration == "real" and self.calibration_data is None:
            raise ValueError("calibration='real' needs calibration_data")
        if self.calibration != "real" and self.calibration_data is not None:
            raise ValueError("calibration_data is only used with calibration='real'")
        for name in ("num_samples", "distill_batch_size", "mp_keep_estimate", "mp_group_size",
                     "mp_size_bins", "mp_keep_exact"):
            _positive_int(name, getattr(self, name))
        if self.mp_eval_samples is not None:
            _positive_int("mp_eval_samples", self.mp_eval_samples)
        if self.mp_eval_dtype not in MP_EVAL_DTYPES:
            raise ValueError(f"mp_eval_dtype must be one of {MP_EVAL_DTYPES}, got {self.mp_eval_dtype!r}")
        if not _is_int(self.distill_iters) or not 0 <= self.distill_iters <= MAX_COUNT:
            raise ValueError(f"distill_iters must be an integer in [0, {MAX_COUNT}], got {self.distill_iters!r}")
        if not isinstance(self.distill_lr, numbers.Real) or isinstance(self.distill_lr, bool) \
                or not math.isfinite(self.distill_lr) or not self.distill_lr > 0:
            raise ValueError(f"distill_lr must be a finite number > 0, got {self.distill_lr!r}")
        for flag in ("per_channel", "mp_relaxation", "progress"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.percentile is not None and (not isinstance(self.percentile, numbers.Real)
                                            or not 50.0 < self.percentile <= 100.0):
            raise ValueError(f"percentile must be in (50, 100] or None, got {self.percentile!r}")
        if self.act_range not in ACT_RANGES:
            raise ValueError(f"act_range must be one of {ACT_RANGES}, got {self.act_range!r}")
        if self.act_range == "mse" and self.percentile is not None:
            raise ValueError("act_range='mse' chooses its own clipping: leave percentile=None")
        if self.mp_method not in MP_METHODS:
            raise ValueError(f"mp_method must be one of {MP_METHODS}, got {self.mp_method!r}")
        if self.budget_metric not in BUDGET_METRICS:
            raise ValueError(f"budget_metric must be one of {BUDGET_METRICS}, got {self.budget_metric!r}")
        if self.pareto_bins is not None:
            _positive_int("pareto_bins", self.pareto_bins)
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")
        if self.bias_overflow not in BIAS_OVERFLOW_MODES:
            raise ValueError(f"bias_overflow must be one of {BIAS_OVERFLOW_MODES}, got {self.bias_overflow!r}")
        if self.sensitivity not in SENSITIVITY_MEASURES:
            raise ValueError(f"sensitivity must be one of {SENSITIVITY_MEASURES}, got {self.sensitivity!r}")
        if self.float_ops not in FLOAT_OPS_MODES:
            raise ValueError(f"float_ops must be one of {FLOAT_OPS_MODES}, got {self.float_ops!r}")
        self._resolve_formats()
        self._check_accuracy_options()
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string such as 'cpu' or 'cuda', got {self.device!r}")

    def _check_accuracy_options(self) -> None:
        """weight_range, reconstruction, sensitivity_act_quant, distill_relax, distill_augment,
        distill_method."""
        if self.weight_range not in WEIGHT_RANGES:
            raise ValueError(f"weight_range must be one of {WEIGHT_RANGES}, got {self.weight_range!r}")
        if self.reconstruction is not None and not isinstance(self.reconstruction, ReconstructionConfig):
            raise TypeError(f"reconstruction must be None or a ReconstructionConfig, got "
                            f"{type(self.reconstruction).__name__}")
        if not isinstance(self.sensitivity_act_quant, bool):
            raise ValueError(f"sensitivity_act_quant must be a bool, got {self.sensitivity_act_quant!r}")
        if self.sensitivity_act_quant and self.act_bits is None:
            raise ValueError("sensitivity_act_quant=True needs act_bits (activations to quantize)")
        if not isinstance(self.distill_relax, numbers.Real) or isinstance(self.distill_relax, bool) \
                or not math.isfinite(self.distill_relax) or self.distill_relax < 0:
            raise ValueError(f"distill_relax must be a finite number >= 0, got {self.distill_relax!r}")
        if not isinstance(self.distill_method, str) or self.distill_method not in DISTILL_METHODS:
            raise ValueError(f"distill_method must be one of {DISTILL_METHODS}, got {self.distill_method!r}")
        if self.distill_method == "genie" and self.distill_lr != QuantConfig.distill_lr:
            raise ValueError(f"distill_lr={self.distill_lr!r} is ZeroQ's pixel learning rate; distill_method='genie' "
                             "trains with GENIE's rates (pyzeroq.distill_genie): leave distill_lr at its default")
        if self.first_last_bits is not None:
            _check_bits("first_last_bits", self.first_last_bits)
            if self.mixed_precision:
                raise ValueError("first_last_bits applies to uniform weight_bits (mixed precision chooses every layer)")
        if not isinstance(self.distill_augment, bool):
            raise ValueError(f"distill_augment must be a bool, got {self.distill_augment!r}")
        self._check_options_take_effect()

    def _check_options_take_effect(self) -> None:
        """Options that would do nothing in this combination: ValueError naming them (the CLI's rule)."""
        if self.sensitivity_act_quant and not self.mixed_precision:
            raise ValueError("sensitivity_act_quant=True shapes the mixed-precision search; uniform weight_bits "
                             "has none")
        rec = self.reconstruction
        distilled_guard = rec is not None and rec.guard_samples > 0 and rec.guard_data == "distilled" \
            and self.calibration != "real"
        if self.calibration != "distilled" and not distilled_guard:
            set_options = [n for n in DISTILL_OPTIONS if getattr(self, n) != getattr(QuantConfig, n)]
            if set_options:
                raise ValueError(f"{', '.join(set_options)} shape distilled images, which calibration="
                                 f"{self.calibration!r} does not make (nor a reconstruction guard on distilled "
                                 "images): drop them or use calibration='distilled'")

    def _resolve_formats(self) -> None:
        """Fill weight_scheme / act_dtype / act_scheme from ``target`` (or the defaults)."""
        if self.target is not None and self.target not in TARGETS:
            raise ValueError(f"target must be None or one of {tuple(TARGETS)}, got {self.target!r}")
        preset = DEFAULT_FORMAT if self.target is None else TARGETS[self.target]
        for name, allowed in (("weight_scheme", SCHEMES), ("act_dtype", ACT_DTYPES), ("act_scheme", SCHEMES)):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, preset[name])
            elif value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
            elif self.target is not None and value != preset[name]:
                raise ValueError(f"{name}={value!r} contradicts target={self.target!r}, which sets "
                                 f"{name}={preset[name]!r}; leave it unset or drop target")

    @property
    def weight_format(self) -> CodeFormat:
        """:class:`pyzeroq.qspec.CodeFormat` of the weights."""
        symmetric = self.weight_scheme == "symmetric"
        return CodeFormat(signed=symmetric, narrow_range=symmetric, symmetric=symmetric)

    @property
    def act_format(self) -> CodeFormat:
        """:class:`pyzeroq.qspec.CodeFormat` of the activations."""
        return CodeFormat(signed=self.act_dtype == "int8", symmetric=self.act_scheme == "symmetric")

    @property
    def weight_candidates(self) -> tuple[int, ...]:
        return self.weight_bits if isinstance(self.weight_bits, tuple) else (self.weight_bits,)

    @property
    def mixed_precision(self) -> bool:
        return len(self.weight_candidates) > 1
