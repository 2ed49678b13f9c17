"""Stage 2: quantization-aware training with knowledge distillation and the task loss.

:func:`prepare_qat` returns a quantized copy of a detector: every ``nn.Conv2d`` /
``nn.Linear`` is replaced (in place, in a deep copy, so the detector's own
``loss``/``decode``/``predict`` keep working — no torch.fx rewrite needed) by the
project's shared quantized layer (:class:`pyzeroq.quantizers.QuantConv2d` /
:class:`~pyzeroq.quantizers.QuantLinear`, the same quantizer family as ZeroQ PTQ) that
owns its input quantizer: weights per output channel, input per tensor, both with a
learned LSQ step (``Quantizer.learn_step``), bias rounded to int32 at
``input_scale * weight_scale`` (straight-through gradient). The first conv and the
detector's ``head_modules`` use ``first_layer_bits`` / ``head_bits`` (None: left in
float). BatchNorm stays unfolded.

:func:`run_qat`: activation ranges are initialized by min/max (or the configured
percentile) over (up to ``CALIBRATION_IMAGES``) calibration images, then Adam (linear
warm-up over ``warmup`` of the steps, cosine decay, global gradient-norm clipping at
``grad_clip``) on

    w_task * L_det(student(x), labels) + w_kd * tau^2 * sum_{k in kd_keys} KL(teacher || student)
    + w_mse * MSE(FPN features) + w_head * MSE(raw head outputs) + w_modules * MSE(every module)

(:mod:`pyzeroq.detection.kd`; every call of a module shared across levels is matched).
With ``ema_decay`` the returned weights are the exponential moving average of the
iterates. BN affine parameters are trained; the running statistics stay frozen unless
``train_bn_stats``.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn
from tqdm import tqdm

from ..quantizers import QUANT_LAYER_TYPES, QuantAct, QuantConv2d, Quantizer, QuantLinear
from . import distributed as ddp
from .config import QATConfig
from .interface import frozen
from .kd import Capture, WeightAverage, distillation_loss, module_names

CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 64


def _task_loss(student: nn.Module, outputs: dict, targets: list[dict], names) -> torch.Tensor:
    """The detector's task loss, or the sum of the named parts of it (``QATConfig.task_loss_parts``)."""
    if names is None:
        return student.loss(outputs, targets)
    try:
        _, parts = student.loss(outputs, targets, reduce=False)
    except TypeError as exc:
        raise ValueError("task_loss_parts needs a detector whose loss(outputs, targets, reduce=False) "
                         f"returns (total, {{part: loss}}): {exc}") from exc
    unknown = [n for n in names if n not in parts]
    if unknown:
        raise ValueError(f"task_loss_parts: unknown parts {unknown}; the detector's loss has {sorted(parts)}")
    return sum(parts[n] for n in names)


def _quantizable(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def layer_bits(model: nn.Module, cfg: QATConfig) -> dict:
    """{layer name: (weight bits, act bits) or None for float} for every conv / linear."""
    names = _quantizable(model)
    head = set(getattr(model, "head_modules", ()) or (names[-1:] if names else ()))
    out = {}
    for i, n in enumerate(names):
        if i == 0:
            b = cfg.first_layer_bits
            out[n] = None if b is None else (b, b)
        elif n in head:
            b = cfg.head_bits
            out[n] = None if b is None else (b, b)
        else:
            out[n] = (cfg.weight_bits, cfg.act_bits)
    return out


def quant_layer(layer: nn.Module, weight_bits: int, act_bits: int, act_percentile: float | None) -> nn.Module:
    """The QAT form of one conv / linear: weight (per channel) and input (per tensor) quantizers
    in learned-step (LSQ) mode; the weight's step and zero point start from its min/max, the
    input's are set by :func:`calibrate`."""
    cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
    q = cls.from_float(layer, per_channel=True, act_quant=QuantAct(act_bits, percentile=act_percentile))
    q.weight_quant.calibrate(layer.weight, weight_bits)
    q.weight_quant.learn_step()
    q.act_quant.learn_step()
    return q


def check_float_detector(detector: nn.Module, who: str = "detector") -> None:
    """ValueError when ``detector`` already holds quantized layers (QAT starts from the float model)."""
    if any(isinstance(m, QUANT_LAYER_TYPES) for m in detector.modules()):
        raise ValueError(f"{who}: the detector is already quantized; pass its floating-point original")


def prepare_qat(detector: nn.Module, cfg: QATConfig) -> nn.Module:
    """Quantized deep copy of ``detector`` (the original is untouched)."""
    check_float_detector(detector, "prepare_qat")
    model = copy.deepcopy(detector)
    for name, bits in layer_bits(detector, cfg).items():
        if bits is not None:
            _set_module(model, name, quant_layer(model.get_submodule(name), bits[0], bits[1], cfg.act_percentile))
    model.qat_config = cfg
    return model


def quant_modules(model: nn.Module) -> list[nn.Module]:
    """The quantized layers that own their input quantizer (all of them after :func:`prepare_qat`)."""
    return [m for m in model.modules() if isinstance(m, QUANT_LAYER_TYPES) and m.act_quant is not None]


def step_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LSQ step sizes: the ``scale`` of every learned-step quantizer."""
    return [m.scale for m in model.modules() if isinstance(m, Quantizer) and m.learned]


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor, device) -> None:
    """Input ranges of every quantized layer over the first CALIBRATION_IMAGES images
    (``QuantAct``: min/max or percentile), then quantize with them."""
    names = {id(m): n for n, m in model.named_modules()}
    mods = quant_modules(model)
    was = model.training
    model.eval()
    modes = [m.act_quant.mode for m in mods]
    for m in mods:
        m.act_quant.reset()
        m.act_quant.mode = "observe"  # the layer runs in float while its input quantizer observes
    try:
        for s in range(0, min(len(images), CALIBRATION_IMAGES), CALIBRATION_BATCH):
            model(images[s:s + CALIBRATION_BATCH].to(device))
    except BaseException:
        for m, mode in zip(mods, modes):
            m.act_quant.mode = mode
        raise
    finally:
        model.train(was)
    for m in mods:
        try:
            m.act_quant.freeze()
        except RuntimeError as exc:
            raise RuntimeError(f"layer {names[id(m)]!r} saw no input during calibration: {exc}") from exc


def _set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _lr_factor(step: int, cfg: QATConfig) -> float:
    """Linear warm-up over ``warmup * steps`` steps, then cosine decay to 0."""
    warm = int(round(cfg.warmup * cfg.steps))
    if step < warm:
        return (step + 1) / (warm + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))


def _captures(teacher: nn.Module, student: nn.Module, cfg: QATConfig) -> list[Capture]:
    """[teacher features, student features, teacher modules, student modules] (the last two only
    when ``w_modules > 0``; features only when ``w_mse > 0``)."""
    feat = tuple(getattr(teacher, "feature_modules", ()) or ()) if cfg.w_mse > 0 else ()
    mods = module_names(teacher) if cfg.w_modules > 0 else ()
    caps: list[Capture] = []
    try:
        for names in (feat, feat, mods, mods):
            caps.append(Capture(teacher if len(caps) % 2 == 0 else student, names))
    except BaseException:
        for c in caps:
            c.remove()
        raise
    return caps


def run_qat(student: nn.Module, teacher: nn.Module, images: torch.Tensor, targets: list | None, cfg: QATConfig,
            seed: int = 0, device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """Calibrate the quantizers on ``images`` (float [N, 1, H, W]) and train ``student`` in place
    on ``w_task * L_det + distillation`` (:func:`pyzeroq.detection.kd.distillation_loss`), Adam
    with warm-up + cosine, gradient clipping; with ``ema_decay`` the student ends with the EMA
    of its weights. ``targets``: per image {"boxes", "labels"} or None (no task loss). Returns a
    log {"steps", "loss" (per step), "parts" (last step's parts)}. Same seed, same inputs, same
    thread count: the same weights. Under an initialized process group of several processes the
    global batch is sharded over them (:mod:`pyzeroq.detection.distributed`)."""
    calibrate(student, images, device)
    dp = ddp.data_parallel()
    if dp is not None:
        dp.check_qat(cfg, len(images))
        dp.broadcast_state(student)
    log = {"steps": cfg.steps, "loss": [], "parts": {}}
    if cfg.steps == 0:
        student.eval()
        return log
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    step_params = step_parameters(student)
    step_ids = {id(p) for p in step_params}
    other = [p for p in student.parameters() if id(p) not in step_ids]
    opt = torch.optim.Adam([{"params": other, "lr": cfg.lr}, {"params": step_params, "lr": cfg.step_lr}])
    base = [cfg.lr, cfg.step_lr]
    ema = WeightAverage(student, cfg.ema_decay) if cfg.ema_decay is not None else None
    use_task = targets is not None and cfg.w_task > 0
    order = torch.zeros(0, dtype=torch.int64)
    pos = 0
    caps = _captures(teacher, student, cfg)
    try:
        with frozen(teacher):
            bar = tqdm(range(cfg.steps), desc="qat", disable=not progress or not ddp.is_main(), leave=False, mininterval=5)
            for step in bar:
                for g, b in zip(opt.param_groups, base):
                    g["lr"] = b * _lr_factor(step, cfg)
                if pos + cfg.batch_size > len(order):
                    order, pos = torch.randperm(len(images), generator=gen), 0
                idx = order[pos:pos + cfg.batch_size]
                pos += cfg.batch_size
                local = idx if dp is None else dp.shard(idx)
                x = images[local].to(device)
                student.train()
                if not cfg.train_bn_stats:
                    _set_bn_eval(student)
                for c in caps:
                    c.clear()
                with torch.no_grad():
                    t_out = teacher(x)
                s_out = student(x)
                parts = distillation_loss(t_out, s_out, *caps, cfg)
                with contextlib.nullcontext() if dp is None else dp.step():
                    if use_task:
                        parts["task"] = _task_loss(student, s_out, [{k: v.to(device) for k, v in targets[i].items()}
                                                                    for i in local.tolist()], cfg.task_loss_parts)
                if dp is not None:
                    parts = dp.scale_parts(parts, len(local), len(idx), ddp.global_loss(student))
                weights = {"task": cfg.w_task, "kd": cfg.w_kd, "mse": cfg.w_mse, "head": cfg.w_head,
                           "modules": cfg.w_modules}
                loss = sum((weights[k] * v for k, v in parts.items()), x.new_zeros(()))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if dp is not None:
                    dp.reduce_gradients(student.parameters())
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
                opt.step()
                if ema is not None:
                    ema.update(student)
                values = {k: v.item() for k, v in parts.items()} if dp is None else dp.values(parts)
                log["loss"].append(loss.item() if dp is None else sum(weights[k] * v for k, v in values.items()))
                bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()}, refresh=False)
            log["parts"] = values
    finally:
        for c in caps:
            c.remove()
    if ema is not None:
        ema.copy_to(student)
    student.eval()
    return log
