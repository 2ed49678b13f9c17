"""How far the fake-quant model's codes drift from the integer model's, per activation.

The fake-quant model rounds ``f32(float conv output) / y_scale``; the integer model rounds
``f32(int32 acc) * f32(f32(x_scale * w_scale) / y_scale)`` (module docstring of
:mod:`pyzeroq.integer.convert`). Values within a few float32 ulps of a rounding tie land on
neighbouring codes, and a differing code feeds every later layer, so deep networks drift more.
:func:`code_drift` measures it on given images: for every activation quantizer, in graph order,
how many codes differ and by how much.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["LayerDrift", "DriftReport", "code_drift"]

PERCENT = 100.0


@dataclass(frozen=True)
class LayerDrift:
    """One activation quantizer: ``codes`` compared, ``differing`` of them, ``max_distance``
    (largest |fake-quant code - integer code|)."""

    quantizer: str
    slot: str
    codes: int
    differing: int
    max_distance: int

    @property
    def fraction(self) -> float:
        return self.differing / self.codes if self.codes else 0.0


@dataclass
class DriftReport:
    """Per-activation drift in graph order (``layers``), on ``images`` images."""

    images: int
    layers: list = field(default_factory=list)

    @property
    def max_distance(self) -> int:
        return max((d.max_distance for d in self.layers), default=0)

    def to_markdown(self) -> str:
        rows = [f"| {d.quantizer} | {d.slot} | {d.codes} | {d.differing} | {PERCENT * d.fraction:.4f} | "
                f"{d.max_distance} |" for d in self.layers]
        return "\n".join([f"Code drift, fake-quant vs integer model, {self.images} images", "",
                          "| quantizer | integer slot | codes | differing | % | max distance |",
                          "|---|---|---|---|---|---|", *rows]) + "\n"


def _fake_quant_codes(gm, x: torch.Tensor) -> dict:
    """{QuantAct module name: int64 codes} of one forward pass of the fake-quant graph ``gm``."""
    from ..modules import QuantAct

    out, hooks = {}, []
    for name, mod in gm.named_modules():
        if isinstance(mod, QuantAct) and mod.mode == "quantize":
            def hook(m, _inputs, o, name=name):
                scale = np.float32(m.record().scale_value)
                out[name] = np.rint(o.detach().cpu().numpy() / scale).astype(np.int64) + m.record().zero_point_value
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            gm(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def code_drift(qmodel, int_model, x) -> DriftReport:
    """:class:`DriftReport` of ``qmodel`` (a QuantizedModel, or a fake-quant graph such as
    :func:`pyzeroq.integer.exact.integer_exact`'s) against ``int_model`` (its
    :func:`pyzeroq.to_integer`) on images ``x`` ([N, ...] float in the model's input domain).
    An activation whose codes the integer plan fused away (a ReLU folded into its layer) is
    compared at the step that writes them."""
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if arr.dtype.kind != "f":
        raise TypeError(f"drift images must be float images (the fake-quant model's input), got dtype {arr.dtype}")
    x = torch.as_tensor(arr.astype(np.float32))
    gm = getattr(qmodel, "graph_module", qmodel)
    fq = _fake_quant_codes(gm, x)
    env = int_model.run(x.numpy())
    slots = {s.output for s in int_model.steps}
    report = DriftReport(images=int(x.shape[0]))
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in fq:
            continue
        p = node  # the step that wrote these codes: the QuantAct's own, or its source's (a fused ReLU)
        while p.name not in slots and p.args:
            p = p.args[0]
        if p.name not in slots:
            continue
        want = fq[node.target]
        got = env[p.name].astype(np.int64).reshape(want.shape)
        dist = np.abs(got - want)
        report.layers.append(LayerDrift(str(node.target), p.name, int(dist.size), int((dist > 0).sum()),
                                        int(dist.max(initial=0))))
    return report
