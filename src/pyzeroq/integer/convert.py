"""Quantized model -> integer-only model running on the C++ integer simulator.

:func:`to_integer` compiles the fx graph of a quantized model into a typed integer plan
(:func:`pyzeroq.integer.plan.compile_plan`; its docstring has the node -> step mapping) and
returns an :class:`IntegerModel` that runs the steps on :mod:`pyzeroq.integer.simulate`
(codes are uint8, or int8 for signed records; accumulators int32; the only float ops are the logits and the
dequantization of other returned tensors). The runtime
dispatches on the step type through one table, :data:`RUNTIME_HANDLERS`.

Differences from the fake-quantized model are float-rounding effects only: the fake-quant
model rounds ``f32(conv output) / y_scale`` where the integer model rounds
``f32(acc) * f32(f32(x_scale * w_scale) / y_scale)``; values that sit within a few float32
ulps of a rounding tie may land on the neighbouring code. Residual adds (``float32_rne``)
use the same float formula as the fake-quant model and agree exactly.

Save / load: :meth:`IntegerModel.save` writes, with ``torch.save``, a dict of plain data
(dicts, lists, tuples, str / int / float / bool / None and torch tensors; loadable with
``torch.load(path, weights_only=True)``)::

    {"format": "pyzeroq.integer_model", "version": 1, "pyzeroq_version": str (informative),
     "rounding": str, "acc_bits": int, "overflow": str, "output": the output slot (str), or a
     tuple / list / dict (string keys) of slots, as the model returns its tensors,
     "folded_bn": {bn name: conv name}, "bit_widths": {layer: bits},
     "steps": [Step.to_dict(), ...]}   # records via TensorQuant / LayerQuant.to_dict,
                                       # arrays as {"__array__": tensor, "dtype": numpy dtype name}

:func:`load_integer` (= :meth:`IntegerModel.load`) reads it back bit-exactly. Pickling and
deep-copying an IntegerModel go through the same state (accumulator statistics and the
trace log are not part of it).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch
import torch.fx as fx

from .. import __version__
from .._checks import output_path, read_torch_file
from . import simulate as sim
from .plan import MIN_BITS, PlanError, UnsupportedOperationError, compile_plan
from .report import (  # noqa: F401 (IntegerReport, GemmlowpRangeWarning: public)
    REPORT_ACC_BITS,
    GemmlowpRangeWarning,
    IntegerReport,
    _bits_for,
    _worst_case_bits,
    gemmlowp_risks,
)
from .simulate import AccumulatorOverflowError
from .steps import (
    LAYER_STEPS,
    AdaptiveAvgPoolStep,
    AddStep,
    AvgPoolStep,
    ClampStep,
    ConcatStep,
    ConvStep,
    DequantStep,
    GlobalAvgPoolStep,
    InputStep,
    LayoutStep,
    LinearStep,
    LogitsStep,
    LookupStep,
    MaxPoolStep,
    MulStep,
    RequantStep,
    ReshapeStep,
    Step,
    check_handlers,
    check_output_spec,
    from_plain,
    insert_zero_points,
    map_output,
    output_leaves,
    step_from_dict,
    to_plain,
)

__all__ = ["to_integer", "load_integer", "IntegerModel", "IntegerReport", "AccumulatorOverflowError", "GemmlowpRangeWarning",
           "logits_accumulator", "input_lut", "RUNTIME_HANDLERS", "FORMAT", "FORMAT_VERSION"]

FORMAT = "pyzeroq.integer_model"
FORMAT_VERSION = 1
PIXEL_LEVELS = 256
PIXEL_MAX = 255.0
ROUNDINGS = ("float32_rne", "gemmlowp", "dyadic")
OVERFLOWS = ("wrap", "saturate", "error")
MAX_ACC_BITS = 32
BATCH_AND_CHANNEL_DIMS = 2  # [N, C, ...]


def _check_config(rounding: str, acc_bits: int, overflow: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow must be one of {OVERFLOWS}, got {overflow!r}")
    if not isinstance(acc_bits, (int, np.integer)) or isinstance(acc_bits, bool) or \
            not MIN_BITS <= acc_bits <= MAX_ACC_BITS:
        raise ValueError(f"acc_bits must be an int in [{MIN_BITS}, {MAX_ACC_BITS}], got {acc_bits!r}")


def normalize_input(step: InputStep, x: np.ndarray) -> np.ndarray:
    """float32 ``(x - mean) / std`` per channel (x float32 [N, C, ...]); x itself without normalizer."""
    if step.mean is None:
        return x
    shape = (1, -1) + (1,) * (x.ndim - BATCH_AND_CHANNEL_DIMS)
    mean = torch.tensor(step.mean, dtype=torch.float32).view(shape)
    std = torch.tensor(step.std, dtype=torch.float32).view(shape)
    return ((torch.from_numpy(x) - mean) / std).contiguous().numpy()


def input_lut(step: InputStep) -> np.ndarray:
    """[C or 1, 256] codes (the input record's dtype): pixel code p -> activation code of the float
    image ``f32(p / 255)``."""
    pixels = torch.arange(PIXEL_LEVELS, dtype=torch.uint8).float() / PIXEL_MAX
    if step.mean is None:
        return step.quant.quantize(pixels.numpy())[None]
    channels = max(len(step.mean), len(step.std))
    img = pixels.reshape(1, 1, PIXEL_LEVELS, 1).expand(1, channels, PIXEL_LEVELS, 1).contiguous().numpy()
    return step.quant.quantize(np.ascontiguousarray(normalize_input(step, img).reshape(channels, PIXEL_LEVELS)))


@contextmanager
def _naming_layer(step: Step):
    """The simulator's AccumulatorOverflowError, again with the layer's name (message and ``layer``)."""
    try:
        yield
    except AccumulatorOverflowError as exc:
        raise AccumulatorOverflowError(f"layer {step.name!r}: {exc}", layer=step.name) from exc


def logits_accumulator(a: np.ndarray, step: LogitsStep, acc_bits: int, overflow: str,
                       weight_cache: Optional[sim.WeightCache] = None):
    """int32 accumulator [N, O] of the logits layer for codes ``a`` uint8 [N, K]
    (``sim.matmul_integer``: the simulator's acc_bits / overflow model; ``weight_cache`` keeps the
    packed weights across calls). Returns (acc, AccStats)."""
    layer = step.layer
    _, w_zp = layer.weight.channels(layer.out_channels)
    with _naming_layer(step):
        return sim.matmul_integer(a, layer.input.zero_point_value, np.ascontiguousarray(layer.weight_codes.T), w_zp,
                                  layer.bias, acc_bits, overflow, weight_cache=weight_cache)


# steps that keep the channels of their first input (not the binary add / mul: they broadcast)
_CHANNEL_KEEPING = (AvgPoolStep, ClampStep, GlobalAvgPoolStep, MaxPoolStep, RequantStep, LookupStep)


def _first_conv(steps: list) -> Optional[ConvStep]:
    """The first convolution fed (through channel-keeping steps) by the input codes, or None."""
    slots = {steps[0].output}
    for step in steps[1:]:
        if not step.inputs or step.inputs[0] not in slots:
            continue
        if isinstance(step, ConvStep):
            return step
        if isinstance(step, _CHANNEL_KEEPING):
            slots.add(step.output)
    return None


def _input_channels(steps: list) -> Optional[int]:
    """Channels of the input ``x`` the plan expects (None where it does not say): the input
    normalization's, else those of the first convolution fed by the input codes."""
    first = steps[0]
    sizes = {len(v) for v in (first.mean, first.std) if v is not None and len(v) > 1}
    if sizes:
        return max(sizes)
    conv = _first_conv(steps)
    return None if conv is None else int(conv.layer.weight_codes.shape[1]) * int(conv.groups)


def _input_rank(steps: list) -> Optional[int]:
    """Rank of the input the plan expects: [N, C, L] before a Conv1d, [N, C, H, W] before a
    Conv2d; None (any rank >= 2) when no convolution reads the input."""
    conv = _first_conv(steps)
    return None if conv is None or conv.spatial_dims == 0 else BATCH_AND_CHANNEL_DIMS + conv.spatial_dims


def _clamp(y: np.ndarray, lo: int, hi: int, q) -> np.ndarray:
    """``clamp(y, lo, hi)`` on codes of record ``q``, skipping bounds that are the code range's own."""
    if lo > q.qmin:
        y = np.maximum(y, np.asarray(lo, y.dtype))
    return y if hi >= q.qmax else np.minimum(y, np.asarray(hi, y.dtype))


def _clamp_hi(y: np.ndarray, step: Step, q) -> np.ndarray:
    """The upper clamp of ``step``'s fused activation (the kernel's ``relu`` did the lower one)."""
    return _clamp(y, q.qmin, step.clamp_codes()[1], q)


class IntegerModel:
    """Integer-only model: ``int_model(x)`` -> float32 logits [N, classes].

    ``x``: float images [N, C, H, W] (values in [0, 1]; the normalization runs in float32
    and the result is quantized at the boundary, as in the fake-quant model) or uint8 pixels
    [N, C, H, W] (a 256-entry table maps pixel codes to the first activation codes: no float
    op at all before the logits). torch in -> torch out, numpy in -> numpy out.

    ``steps``: the typed plan (list of :class:`pyzeroq.integer.steps.Step`, ``steps[0]`` the
    :class:`InputStep`); ``output``: the value slot of the logits, or a tuple / list / dict of
    slots (:func:`pyzeroq.integer.steps.output_leaves`): calling the model returns that structure.
    Set ``trace = True`` to record, per executed step, its input / output dtypes in
    ``trace_log`` (list of dicts).
    """

    def __init__(self, steps: list, output: str, rounding: str = "float32_rne", acc_bits: int = 32,
                 overflow: str = "wrap", folded_bn: Optional[dict] = None, bit_widths: Optional[dict] = None):
        _check_config(rounding, acc_bits, overflow)
        if not steps or not isinstance(steps[0], InputStep):
            raise ValueError("an integer model's first step must be an InputStep")
        unknown = [type(s).__name__ for s in steps if type(s) not in RUNTIME_HANDLERS]
        if unknown:
            raise TypeError(f"not integer steps: {unknown}")
        check_output_spec(output)
        written = {s.output for s in steps}
        missing = [slot for _, slot in output_leaves(output) if slot not in written]
        if missing:
            raise ValueError(f"output slots {missing!r} are written by no step")
        self.steps = list(steps)
        self.output = output
        self.rounding = rounding
        self.acc_bits = int(acc_bits)
        self.overflow = overflow
        self.folded_bn = dict(folded_bn or {})
        self.bit_widths = dict(bit_widths or {})
        self.input_q = self.steps[0].quant
        self.input_lut = input_lut(self.steps[0])
        self.input_channels = _input_channels(self.steps)
        self.input_rank = _input_rank(self.steps)
        self.trace = False
        self.trace_log: list = []
        self.drift = None  # DriftReport when to_integer was given drift_images
        self._bound = {s.name: _worst_case_bits(s) for s in self.steps if isinstance(s, LAYER_STEPS)}
        self._weight_caches = {}  # step name -> sim.WeightCache (packed weights kept across calls)
        self.reset_stats()

    # ----------------------------------------------------------------- save / load
    def to_state(self) -> dict:
        """The saved form (module docstring): plain data and torch tensors only."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "pyzeroq_version": __version__, "rounding": self.rounding,
                "acc_bits": self.acc_bits, "overflow": self.overflow, "output": self.output,
                "folded_bn": dict(self.folded_bn), "bit_widths": to_plain(dict(self.bit_widths)),
                "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_state(cls, state, source: str = "state") -> "IntegerModel":
        """The model :meth:`to_state` described; ValueError naming ``source`` for anything else."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{source}: not a pyzeroq integer model (no format key {FORMAT!r})")
        version = state.get("version")
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise ValueError(f"{source}: integer model format version {version!r} is not supported "
                             f"(this pyzeroq reads versions 1..{FORMAT_VERSION})")
        try:
            steps = [step_from_dict(d) for d in state["steps"]]
            return cls(steps, state["output"], state["rounding"], state["acc_bits"], state["overflow"],
                       state["folded_bn"], from_plain(state["bit_widths"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: invalid integer model ({type(exc).__name__}: {exc})") from exc

    def save(self, path) -> None:
        """Write the model to ``path`` with ``torch.save`` (loadable with ``weights_only=True``);
        TypeError / FileNotFoundError / ValueError naming ``path`` before writing."""
        torch.save(self.to_state(), output_path(path, "path"))

    @classmethod
    def load(cls, path) -> "IntegerModel":
        """The model :meth:`save` wrote to ``path`` (ValueError naming the path if it is not one)."""
        return cls.from_state(read_torch_file(path, "a pyzeroq integer model"), source=str(path))

    def __getstate__(self) -> dict:
        return self.to_state()

    def __setstate__(self, state: dict) -> None:
        # rebuilt from plain data: arrays get numpy's canonical dtypes (the kernels check dtype identity)
        self.__dict__.update(type(self).from_state(state, source="pickled IntegerModel").__dict__)

    # ----------------------------------------------------------------- stats
    def reset_stats(self) -> None:
        self._stats = {s.name: {"min": 0, "max": 0, "overflows": 0, "op": s.kind} for s in self.steps
                       if isinstance(s, LAYER_STEPS)}
        self._images = 0

    def _record(self, name: str, st: sim.AccStats) -> None:
        rec = self._stats[name]
        rec["min"], rec["max"] = min(rec["min"], st.min_acc), max(rec["max"], st.max_acc)
        rec["bits"] = _bits_for(rec["min"], rec["max"])
        rec["overflows"] += st.overflow_count

    def report(self, x=None) -> IntegerReport:
        """Accumulator ranges per layer over the inputs run so far (or over ``x``, run now)."""
        if x is not None:
            self.reset_stats()
            self(x)
        if not self._images:
            raise ValueError("no inputs have been run yet: call int_model(x) first or pass x to report(x)")
        rows = []
        for name, rec in self._stats.items():
            bits = rec.get("bits", 1)
            row = {"layer": name, "op": rec["op"], "max_abs_acc": max(rec["max"], -rec["min"]),
                   "bits_needed": bits, "bound_bits": self._bound[name], "overflows": rec["overflows"]}
            row.update({f"overflow_int{b}": bits > b for b in REPORT_ACC_BITS})
            rows.append(row)
        return IntegerReport(self.acc_bits, self.overflow, self.rounding, self._images, rows, self.folded_bn)

    # ----------------------------------------------------------------- run
    def check_input(self, x, argument: str = "x") -> np.ndarray:
        """``x`` as a numpy array [N, C, ...] (the rank the first conv reads: [N, C, H, W] or
        [N, C, L]) of uint8 pixels or float32 images, or a
        TypeError / ValueError naming ``argument``: not an array or tensor, another dtype
        (ints other than uint8, bool, complex), another rank, channels the model does not
        have, NaN / Inf. An empty batch (N = 0) is valid."""
        if isinstance(x, torch.Tensor):
            if x.device.type == "meta":
                raise ValueError(f"{argument} is a meta tensor: it holds no values")
            if x.dtype == torch.bfloat16:  # numpy has no bfloat16
                x = x.float()
            arr = x.detach().cpu().numpy()
        elif isinstance(x, np.ndarray):
            arr = x
        else:
            raise TypeError(f"{argument} must be a numpy array or a torch tensor, got {type(x).__name__}")
        if arr.dtype != np.uint8 and arr.dtype.kind != "f":
            raise TypeError(f"{argument} must be float images in [0, 1] or uint8 pixels, got dtype {arr.dtype}")
        if arr.ndim != (self.input_rank or arr.ndim) or arr.ndim < BATCH_AND_CHANNEL_DIMS:
            expected = {3: "[N, C, L]", 4: "[N, C, H, W]"}.get(self.input_rank, "[N, C, ...]")
            raise ValueError(f"{argument} must have shape {expected}, got shape {tuple(arr.shape)}")
        channels = self.input_channels
        if channels is not None and arr.shape[1] != channels:
            raise ValueError(f"{argument} has {arr.shape[1]} channels (shape {tuple(arr.shape)}), the model "
                             f"takes {channels}")
        if arr.dtype == np.uint8:
            if self.input_lut.shape[0] not in (1, arr.shape[1]):
                raise ValueError(f"{argument} has {arr.shape[1]} channels, the input normalization has "
                                 f"{self.input_lut.shape[0]}")
            return arr
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{argument} contains NaN or Inf")
        return arr

    def input_codes(self, x) -> np.ndarray:
        """Boundary: the first activation's uint8 codes [N, C, ...] for float images or uint8 pixels."""
        arr = self.check_input(x)
        if arr.dtype == np.uint8:
            lut = self.input_lut
            rows = np.arange(arr.shape[1]).reshape(1, -1, *[1] * (arr.ndim - 2)) if lut.shape[0] > 1 else 0
            return np.ascontiguousarray(lut[rows, arr])
        return self.input_q.quantize(normalize_input(self.steps[0], arr))

    def _run_empty(self, x) -> dict:
        """:meth:`run` of an empty batch: every slot empty in its batch dimension, with the
        shapes of one zero image (run without counting in the statistics), as torch models
        return [0, classes] for an empty batch."""
        arr = self.check_input(x)
        stats, images, log = {k: dict(v) for k, v in self._stats.items()}, self._images, self.trace_log
        try:
            env = self.run(np.zeros((1,) + arr.shape[1:], arr.dtype))
        finally:
            self._stats, self._images, self.trace_log = stats, images, log
        return {k: v[:0] for k, v in env.items()}

    def run(self, x) -> dict:
        """All value slots (fx node name -> codes / logits) for input ``x``."""
        if isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim >= 1 and x.shape[0] == 0:
            return self._run_empty(x)
        first = self.steps[0]
        env = {first.inputs[0]: x}
        self.trace_log = []
        for step in self.steps:
            args = [env[s] for s in step.inputs]
            out = self._exec(step, args)
            env[step.output] = out
            if self.trace:
                self.trace_log.append({"step": step.name, "op": step.kind, "inputs": [_dtype_name(a) for a in args],
                                       "output": str(out.dtype)})
        del env[first.inputs[0]]
        self._images += len(env[first.output])
        return env

    def __call__(self, x):
        """The model's output for images ``x``: float32 [N, ...] (logits, or dequantized codes),
        or the structure (tuple / list / dict) of them the quantized model returns. ``x``: uint8
        pixels, or floats that the first activation's quantizer turns into codes: values beyond
        its calibrated range saturate to the end codes (no error), as in the fake-quant model
        and onnxruntime's QuantizeLinear."""
        env = self.run(x)
        wrap = torch.from_numpy if isinstance(x, torch.Tensor) else (lambda a: a)
        return map_output(self.output, lambda slot: wrap(env[slot]))

    def predict(self, x) -> np.ndarray:
        """Top-1 class along axis 1 of a single-output model: [N] for logits, [N, H, W] for a class
        map (ValueError for a structured output)."""
        if not isinstance(self.output, str):
            raise ValueError("predict needs a model with one output tensor (logits); this one returns a "
                             f"{type(self.output).__name__}: call the model and read the output you need")
        return np.asarray(self.run(x)[self.output]).argmax(1)

    def _weight_cache(self, step: Step) -> sim.WeightCache:
        """This model's cache of the step's packed weights (copies of the model start empty ones)."""
        if step.name not in self._weight_caches:
            self._weight_caches[step.name] = sim.WeightCache()
        return self._weight_caches[step.name]

    def _exec(self, step: Step, args: list) -> np.ndarray:
        return RUNTIME_HANDLERS[type(step)](self, step, args)

    # ----------------------------------------------------------------- step handlers
    def _input(self, step: InputStep, args: list) -> np.ndarray:
        return self.input_codes(args[0])

    def _conv(self, step: ConvStep, args: list) -> np.ndarray:
        layer, xq, yq = step.layer, step.layer.input, step.layer.output
        w_scale, w_zp = layer.weight.channels(layer.out_channels)
        x, w = args[0], layer.weight_codes
        shape = x.shape
        if step.spatial_dims == 0:  # a channel affine over any rank: [N, C, 1, prod(...)]
            x = x.reshape(shape[0], shape[1], 1, -1)
            w = w[:, :, None, :]
        elif step.spatial_dims == 1:  # Conv1d as a Conv2d over [N, C, 1, L]
            x, w = x[:, :, None, :], w[:, :, None, :]
        if step.upsample != (1, 1):  # ConvTranspose2d: zero-point codes between the pixels
            x = insert_zero_points(x, step.upsample, xq.zero_point_value)
        with _naming_layer(step):
            y, st = sim.qlinear_conv2d(x, xq.scale_value, xq.zero_point_value, w, w_scale, w_zp,
                                       yq.scale_value, yq.zero_point_value, layer.bias, step.stride, step.padding,
                                       step.dilation, step.groups, rounding=self.rounding, out_bits=yq.bits,
                                       acc_bits=self.acc_bits, overflow=self.overflow,
                                       relu=layer.activation is not None, y_signed=yq.signed,
                                       weight_cache=self._weight_cache(step))
        self._record(step.name, st)
        y = y.reshape(shape[0], -1, *shape[2:]) if step.spatial_dims == 0 else \
            y[:, :, 0, :] if step.spatial_dims == 1 else y
        return _clamp_hi(y, step, yq)

    def _linear(self, step: LinearStep, args: list) -> np.ndarray:
        layer, xq, yq = step.layer, step.layer.input, step.layer.output
        w_scale, w_zp = layer.weight.channels(layer.out_channels)
        with _naming_layer(step):
            y, st = sim.qlinear_matmul(args[0], xq.scale_value, xq.zero_point_value,
                                       np.ascontiguousarray(layer.weight_codes.T), w_scale, w_zp, yq.scale_value,
                                       yq.zero_point_value, layer.bias, rounding=self.rounding, out_bits=yq.bits,
                                       acc_bits=self.acc_bits, overflow=self.overflow,
                                       relu=layer.activation is not None, y_signed=yq.signed,
                                       weight_cache=self._weight_cache(step))
        self._record(step.name, st)
        return _clamp_hi(y, step, yq)

    def _logits(self, step: LogitsStep, args: list) -> np.ndarray:
        acc, st = logits_accumulator(args[0], step, self.acc_bits, self.overflow, self._weight_cache(step))
        self._record(step.name, st)
        if self.trace:
            self.trace_log.append({"step": step.name, "op": "accumulate", "inputs": [str(args[0].dtype)],
                                   "output": str(acc.dtype)})
        return acc.astype(np.float32) * step.dequant  # the only float op: logits

    def _add(self, step: AddStep, args: list) -> np.ndarray:
        return self._binary(sim.qadd, step, args)

    def _mul(self, step: MulStep, args: list) -> np.ndarray:
        return self._binary(sim.qmul, step, args)

    def _binary(self, kernel, step: AddStep, args: list) -> np.ndarray:
        """``sim.qadd`` / ``sim.qmul`` of the step's two code tensors, requantized to its record."""
        a, b, yq = step.x_q, step.y_q, step.quant
        y = kernel(args[0], a.scale_value, a.zero_point_value, args[1], b.scale_value, b.zero_point_value,
                   yq.scale_value, yq.zero_point_value, relu=step.activation is not None, out_bits=yq.bits,
                   rounding=self.rounding, y_signed=yq.signed)
        return _clamp_hi(y, step, yq)

    def _global_avg_pool(self, step: GlobalAvgPoolStep, args: list) -> np.ndarray:
        xq, yq, x = step.x_q, step.quant, args[0]
        one_d = x.ndim == 3  # [N, C, L] (AdaptiveAvgPool1d(1)) as [N, C, 1, L]
        y = sim.global_avg_pool2d(x[:, :, None, :] if one_d else x, xq.scale_value, xq.zero_point_value,
                                  yq.scale_value, yq.zero_point_value, out_bits=yq.bits, rounding=self.rounding,
                                  y_signed=yq.signed)
        return _clamp(y[:, :, 0] if one_d else y, *step.clamp_codes(), yq)

    def _avg_pool(self, step: AvgPoolStep, args: list) -> np.ndarray:
        return self._window_average(step, args[0], step.kernel, step.stride, step.padding)

    def _adaptive_avg_pool(self, step: AdaptiveAvgPoolStep, args: list) -> np.ndarray:
        window = step.window(*args[0].shape[2:])
        return self._window_average(step, args[0], window, window, (0, 0))

    def _window_average(self, step: Step, x: np.ndarray, kernel, stride, padding) -> np.ndarray:
        """Exact window sums (an all-ones depthwise conv), one requantization ``M = f32(f32(sx/sy) / f32(kh*kw))``."""
        xq, yq, (kh, kw) = step.x_q, step.quant, kernel
        ones = np.ones((x.shape[1], 1, kh, kw), np.uint8)
        ratio = np.float32(np.float32(xq.scale_value) / np.float32(yq.scale_value))
        y, _ = sim.qlinear_conv2d(x, ratio, xq.zero_point_value, ones, 1.0, 0, float(kh * kw), yq.zero_point_value,
                                  None, stride, padding, 1, x.shape[1], out_bits=yq.bits, rounding=self.rounding,
                                  y_signed=yq.signed)
        return _clamp(y, *step.clamp_codes(), yq)

    def _max_pool(self, step: MaxPoolStep, args: list) -> np.ndarray:
        xq, yq = step.x_q, step.quant
        y = sim.max_pool2d(args[0], step.kernel, step.stride, step.ceil_padding(*args[0].shape[2:]))
        if xq != yq:
            y = self._requantize(y, xq, yq)
        return _clamp(y, *step.clamp_codes(), yq)

    def _requant(self, step: RequantStep, args: list) -> np.ndarray:
        return self._requantize(args[0], step.x_q, step.quant)

    def _requantize(self, x: np.ndarray, xq, yq) -> np.ndarray:
        """Codes of ``xq`` -> codes of ``yq`` with ``M = f32(sx / sy)``."""
        mult = np.float32(np.float32(xq.scale_value) / np.float32(yq.scale_value))
        return sim.requantize(x.astype(np.int32) - np.int32(xq.zero_point_value), mult, yq.zero_point_value,
                              out_bits=yq.bits, rounding=self.rounding, y_signed=yq.signed)

    def _clamp_step(self, step: ClampStep, args: list) -> np.ndarray:
        return _clamp(args[0], step.lo, step.hi, step.x_q)

    def _reshape(self, step: ReshapeStep, args: list) -> np.ndarray:
        return step.apply(*args)

    def _layout(self, step: LayoutStep, args: list) -> np.ndarray:
        return step.apply(args[0])

    def _concat(self, step: ConcatStep, args: list) -> np.ndarray:
        """Each input requantized to the output record (``M = f32(s_in / s_out)``), then concatenated."""
        parts = [x if xq == step.quant else self._requantize(x, xq, step.quant)
                 for x, xq in zip(args, step.x_qs)]
        return np.concatenate(parts, axis=step.dim)

    def _lookup(self, step: LookupStep, args: list) -> np.ndarray:
        return np.take(step.table, args[0])  # y = table[x]

    def _dequant(self, step: DequantStep, args: list) -> np.ndarray:
        return step.apply(args[0])


RUNTIME_HANDLERS = check_handlers({
    InputStep: IntegerModel._input, ConvStep: IntegerModel._conv, LinearStep: IntegerModel._linear,
    LogitsStep: IntegerModel._logits, AddStep: IntegerModel._add, GlobalAvgPoolStep: IntegerModel._global_avg_pool,
    AvgPoolStep: IntegerModel._avg_pool, MaxPoolStep: IntegerModel._max_pool, RequantStep: IntegerModel._requant,
    ClampStep: IntegerModel._clamp_step, ReshapeStep: IntegerModel._reshape, LookupStep: IntegerModel._lookup,
    ConcatStep: IntegerModel._concat, DequantStep: IntegerModel._dequant,
    LayoutStep: IntegerModel._layout, MulStep: IntegerModel._mul,
    AdaptiveAvgPoolStep: IntegerModel._adaptive_avg_pool,
}, "IntegerModel")


def _dtype_name(x) -> str:
    if isinstance(x, torch.Tensor):
        return str(x.numpy().dtype) if x.device.type == "cpu" else str(x.dtype)
    return str(np.asarray(x).dtype)


def load_integer(path, device="cpu") -> IntegerModel:
    """The :class:`IntegerModel` saved at ``path`` by :meth:`IntegerModel.save` (ValueError
    naming the path for a file that is not one). ``device``: only "cpu" (the simulator's; the
    argument matches the loaders ``pyzeroq.load`` dispatches to)."""
    if str(device) != "cpu":
        raise ValueError(f"the integer model runs on the CPU simulator, got device={device!r}")
    return IntegerModel.load(path)


def to_integer(qmodel, rounding: str = "float32_rne", acc_bits: int = 32, overflow: str = "wrap",
               drift_images=None) -> IntegerModel:
    """Integer-only model of a quantized model (see the module docstring for the mapping).

    ``rounding``: requantization mode of every conv / linear / add / pool ("float32_rne"
    matches onnxruntime and the fake-quant model best; "gemmlowp" TFLite; "dyadic" HAWQ-V3).
    ``acc_bits`` / ``overflow``: accumulator register model of the conv / linear layers
    ("error" raises :class:`AccumulatorOverflowError` naming the layer and the bits needed).
    ``drift_images``: float images [N, ...]; when given, ``int_model.drift`` is a
    :class:`pyzeroq.integer.drift.DriftReport` of how many activation codes of the fake-quant
    model differ from the integer model's on them, per quantizer, and by how much.
    Raises :class:`pyzeroq.integer.plan.UnsupportedOperationError` for ops without an integer
    form and :class:`pyzeroq.integer.plan.PlanError` for a model that is not fully quantized.
    Warns :class:`GemmlowpRangeWarning` (naming the steps) when ``rounding="gemmlowp"`` can wrap
    int32 as TFLite's reference kernels do (:func:`pyzeroq.integer.report.gemmlowp_risks`).
    """
    gm = getattr(qmodel, "graph_module", None)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"qmodel must be a QuantizedModel returned by pyzeroq.quantize, got {type(qmodel).__name__}")
    _check_config(rounding, acc_bits, overflow)
    if hasattr(qmodel, "act_bits") and qmodel.act_bits is None:
        raise PlanError("qmodel keeps its activations in float (quantized with act_bits=None): an integer-only "
                        "model needs quantized activations; quantize with act_bits set (e.g. 8)")
    report = getattr(qmodel, "report", None)
    float_ops = list(getattr(report, "float_ops", []) or [])
    if float_ops:
        node, _, op = str(float_ops[0]).partition(" (")
        raise UnsupportedOperationError(f"the quantized model keeps float ops that have no integer form: {float_ops}",
                                        node, op.partition(")")[0] or None)
    plan = compile_plan(gm)
    int_model = IntegerModel(list(plan.steps), plan.output, rounding, int(acc_bits), overflow,
                             getattr(report, "folded_bn", {}) or {}, getattr(qmodel, "bit_widths", {}) or {})
    if rounding == "gemmlowp":
        risks = gemmlowp_risks(int_model.steps)
        if risks:
            warnings.warn("rounding='gemmlowp': TFLite's fixed-point requantization can wrap int32 (as the "
                          f"reference kernels do; the simulator reproduces it) in {'; '.join(risks)}; "
                          "rounding='float32_rne' or 'dyadic' keep these codes exact", GemmlowpRangeWarning,
                          stacklevel=2)
    if drift_images is not None:
        from .drift import code_drift
        int_model.drift = code_drift(qmodel, int_model, int_model.check_input(drift_images, "drift_images"))
    return int_model
