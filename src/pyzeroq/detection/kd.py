"""Distillation targets of the detection QAT (stage 2) and the weight average of its result.

:class:`Capture` records the output of named submodules on *every* call of a forward
(a head shared across FPN levels runs once per level; keeping only the last call would
match one level). :func:`distillation_loss` sums, with the weights of
:class:`~pyzeroq.detection.config.QATConfig`:

* ``kd``: ``tau^2 * sum_k sum_levels KL(teacher || student)`` of the sigmoid
  probabilities at temperature ``tau`` of every output key ``k`` in ``kd_keys``
  (our FCOS: class logits and centerness, both sigmoid distributions; the box
  distances are not a distribution and get MSE only);
* ``mse``: ``sum_f MSE(teacher f, student f)`` over the detector's ``feature_modules``
  (the FPN outputs), every call;
* ``head``: ``sum_leaves MSE`` over every tensor of the raw head output (class, box and
  centerness maps, all levels) — the only target that teaches the box branch beside the
  task loss;
* ``modules``: the mean over every call of every ``nn.Conv2d`` / ``nn.Linear`` /
  BatchNorm (the quantized layers keep their names) of the MSE between teacher and
  student outputs — the reference code's per-module form.

:class:`WeightAverage` keeps an exponential moving average (EMA) of the float parameters
and buffers of the student; the evaluated weights are the average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..outputs import output_leaves

MODULE_TYPES = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)


class Capture:
    """Forward hooks on ``names`` of ``model``; ``out[name]`` is the list of outputs of every
    call since the last :meth:`clear` (in call order). Use as a context manager or call
    :meth:`remove`. Raises AttributeError (from ``get_submodule``) for an unknown name."""

    def __init__(self, model: nn.Module, names):
        self.names = tuple(names)
        self.out: dict[str, list] = {n: [] for n in self.names}
        self.handles = []
        try:
            for n in self.names:
                self.handles.append(model.get_submodule(n).register_forward_hook(self._hook(n)))
        except BaseException:
            self.remove()
            raise

    def _hook(self, name):
        def fn(module, inputs, output):
            self.out[name].append(output)
        return fn

    def clear(self) -> None:
        for v in self.out.values():
            v.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def module_names(model: nn.Module) -> tuple[str, ...]:
    """Names of every conv / linear / BatchNorm of an FP ``model`` (the per-module targets)."""
    return tuple(n for n, m in model.named_modules() if isinstance(m, MODULE_TYPES))


def sigmoid_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Binary KL(teacher || student) of sigmoid(logits / tau), summed over dim 1 (classes),
    mean over the rest (images, locations). Float tensors of one shape [N, C, ...]."""
    t = teacher_logits / tau
    s = student_logits / tau
    pt = torch.sigmoid(t)
    # KL = pt (log pt - log ps) + (1 - pt)(log(1 - pt) - log(1 - ps))
    kl = pt * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - pt) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.sum(1).mean()


def _levels(outputs: dict, key: str) -> list:
    if not isinstance(outputs, dict) or key not in outputs:
        raise ValueError(f"kd_keys: the detector's output has no key {key!r} "
                         f"(keys: {sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__})")
    v = outputs[key]
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _paired_mse(t_list: list, s_list: list, name: str) -> list[torch.Tensor]:
    if len(t_list) != len(s_list):
        raise RuntimeError(f"{name}: the teacher ran {len(t_list)} times, the student {len(s_list)}")
    return [F.mse_loss(s.float(), t.float()) for t, s in zip(t_list, s_list)]


def distillation_loss(t_out, s_out, t_cap: Capture | None, s_cap: Capture | None,
                      m_t: Capture | None, m_s: Capture | None, cfg) -> dict[str, torch.Tensor]:
    """The weighted-in-config distillation parts (unweighted values; see the module docstring):
    {"kd", "mse", "head", "modules"}, each present when its weight in ``cfg`` is > 0.
    ``t_cap`` / ``s_cap``: captures of the feature modules; ``m_t`` / ``m_s``: of every
    module (``w_modules > 0``)."""
    parts: dict[str, torch.Tensor] = {}
    if cfg.w_kd > 0:
        kd = [sigmoid_kl(t, s, cfg.tau) for k in cfg.kd_keys for t, s in zip(_levels(t_out, k), _levels(s_out, k))]
        parts["kd"] = torch.stack(kd).sum() * cfg.tau ** 2
    if cfg.w_mse > 0:
        if t_cap is not None and t_cap.names:
            pairs = [x for n in t_cap.names for x in _paired_mse(t_cap.out[n], s_cap.out[n], n)]
        else:  # no feature modules: the raw outputs are the features
            pairs = _paired_mse(output_leaves(t_out), output_leaves(s_out), "outputs")
        parts["mse"] = torch.stack(pairs).sum()
    if cfg.w_head > 0:
        parts["head"] = torch.stack(_paired_mse(output_leaves(t_out), output_leaves(s_out), "outputs")).sum()
    if cfg.w_modules > 0:
        per = [x for n in m_t.names for x in _paired_mse(m_t.out[n], m_s.out[n], n)]
        parts["modules"] = torch.stack(per).mean()
    return parts


class WeightAverage:
    """EMA of ``model``'s floating-point parameters and buffers (by state_dict key):
    ``avg = d * avg + (1 - d) * current`` with ``d = min(decay, (1 + t) / (10 + t))`` at update
    ``t`` (the usual warm-up of the decay, so a short run is not dominated by its start).
    :meth:`copy_to` writes the average into a model of the same layout."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.avg = {k: v.detach().clone() for k, v in model.state_dict().items()
                    if isinstance(v, torch.Tensor) and v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for k, v in model.state_dict().items():
            if k in self.avg:
                self.avg[k].mul_(d).add_(v.detach(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        state = model.state_dict()
        for k, v in self.avg.items():
            state[k].copy_(v)
