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
percentile) over (up to ``CALIBRATION_IMAGES``) calibration images, then Adam with a
cosine schedule on

    w_task * L_det(student(x), labels) + w_kd * tau^2 * KL(teacher || student)
    + w_mse * sum_f MSE(teacher feature f, student feature f)

KL: binary KL of the sigmoid class probabilities at temperature tau (the detector's
classifier is sigmoid/focal style), summed over classes, averaged over locations and
images. Features: the detector's ``feature_modules`` (FPN outputs for ours) or,
without them, all raw head outputs. BN affine parameters are trained; the running
statistics stay frozen unless ``train_bn_stats``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..outputs import output_leaves
from ..quantizers import QUANT_LAYER_TYPES, QuantAct, QuantConv2d, Quantizer, QuantLinear
from .config import QATConfig

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


def prepare_qat(detector: nn.Module, cfg: QATConfig) -> nn.Module:
    """Quantized deep copy of ``detector`` (the original is untouched)."""
    if any(isinstance(m, QUANT_LAYER_TYPES) for m in detector.modules()):
        raise ValueError("prepare_qat: the detector is already quantized; pass its floating-point original")
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


def sigmoid_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Binary KL(teacher || student) of sigmoid(logits / tau), summed over dim 1, mean over the rest."""
    t = teacher_logits / tau
    s = student_logits / tau
    pt = torch.sigmoid(t)
    # KL = pt (log pt - log ps) + (1 - pt)(log(1 - pt) - log(1 - ps))
    kl = pt * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - pt) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.sum(1).mean()


class _Capture:
    def __init__(self, model: nn.Module, names):
        self.out: dict = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def fn(module, inputs, output):
            self.out[name] = output
        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


def _set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def run_qat(student: nn.Module, teacher: nn.Module, images: torch.Tensor, targets: list | None, cfg: QATConfig,
            seed: int = 0, device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """Calibrate the quantizers on ``images`` and train ``student`` in place; returns a log."""
    calibrate(student, images, device)
    log = {"steps": cfg.steps, "loss": []}
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
    feat_names = tuple(getattr(teacher, "feature_modules", ()) or ())
    t_cap, s_cap = _Capture(teacher, feat_names), _Capture(student, feat_names)
    t_flags = [p.requires_grad for p in teacher.parameters()]
    teacher_mode = teacher.training
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    use_task = targets is not None and cfg.w_task > 0
    order = torch.zeros(0, dtype=torch.int64)
    pos = 0
    try:
        bar = tqdm(range(cfg.steps), desc="qat", disable=not progress, leave=False, mininterval=5)
        for step in bar:
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            if pos + cfg.batch_size > len(order):
                order, pos = torch.randperm(len(images), generator=gen), 0
            idx = order[pos:pos + cfg.batch_size]
            pos += cfg.batch_size
            x = images[idx].to(device)
            student.train()
            if not cfg.train_bn_stats:
                _set_bn_eval(student)
            with torch.no_grad():
                t_out = teacher(x)
            s_out = student(x)
            loss = x.new_zeros(())
            parts = {}
            if use_task:
                parts["task"] = _task_loss(student, s_out, [{k: v.to(device) for k, v in targets[i].items()}
                                                            for i in idx.tolist()], cfg.task_loss_parts)
                loss = loss + cfg.w_task * parts["task"]
            if cfg.w_kd > 0:
                parts["kd"] = sum(sigmoid_kl(t, s, cfg.tau) for t, s in zip(t_out["cls"], s_out["cls"])) \
                    * cfg.tau ** 2
                loss = loss + cfg.w_kd * parts["kd"]
            if cfg.w_mse > 0:
                if feat_names:
                    pairs = [(t_cap.out[n], s_cap.out[n]) for n in feat_names]
                else:
                    pairs = list(zip(output_leaves(t_out), output_leaves(s_out)))
                parts["mse"] = sum(F.mse_loss(s, t) for t, s in pairs)
                loss = loss + cfg.w_mse * parts["mse"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log["loss"].append(loss.item())
            bar.set_postfix({k: f"{v.item():.4f}" for k, v in parts.items()}, refresh=False)
    finally:
        t_cap.remove()
        s_cap.remove()
        for p, f in zip(teacher.parameters(), t_flags):
            p.requires_grad_(f)
        teacher.train(teacher_mode)
    student.eval()
    return log
