"""ZeroQ sensitivity (Eq. 2): KL(FP output || output with some layers' weights quantized).

    Omega_i(k) = 1/N sum_j KL(softmax(M(x_j)) || softmax(M_i^k(x_j)))

averaged over the calibration batch, activations kept in float; for models that return
anything but one logits tensor (maps, tuples, dicts) a variance-normalised MSE instead
(:mod:`pyzeroq.outputs`, ``QuantConfig.sensitivity``). ``JointEvaluator``
measures the same quantity for several layers quantized at once, for many
configurations in one batched (``torch.func.vmap``) forward pass — the exact
re-evaluation step of the Appendix-A grouped search.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from tqdm import tqdm

from .modules import quant_layers, set_act_mode, set_weight_bits
from .outputs import concat_outputs, kl_divergence, output_distance, output_leaves, resolve_measure

__all__ = ["layer_sensitivities", "JointEvaluator", "kl_divergence"]

# Images x configurations per vmapped forward; bounds the memory of the exact re-evaluation.
JOINT_EVAL_IMAGES_PER_CHUNK = 4096


@torch.no_grad()
def _forward_leaves(model: nn.Module, data: torch.Tensor, batch_size: int) -> list:
    return concat_outputs([output_leaves(model(data[i:i + batch_size])) for i in range(0, len(data), batch_size)])


@torch.no_grad()
def layer_sensitivities(gm: nn.Module, data: torch.Tensor, candidates: tuple[int, ...],
                        batch_size: int = 256, progress: bool = False,
                        measure: str = "auto") -> tuple[list[str], np.ndarray]:
    """Omega[i, b] for every quantized layer i and candidate bit width b (activations float):
    the distance ``measure`` (:mod:`pyzeroq.outputs`: "kl" = ZeroQ Eq. 2 on logits, "mse" =
    variance-normalised squared error summed over the returned tensors, "auto") between the
    float model's output and the output with layer i's weights at b bits."""
    layers = quant_layers(gm)
    set_act_mode(gm, "off")
    set_weight_bits(gm, None)
    reference = _forward_leaves(gm, data, batch_size)
    measure = resolve_measure(reference, measure)
    names = list(layers)
    omega = np.zeros((len(names), len(candidates)), dtype=np.float64)
    for i, name in enumerate(tqdm(names, desc="sensitivity", disable=not progress, leave=False)):
        for b, bits in enumerate(candidates):
            layers[name].set_weight_bits(bits)
            omega[i, b] = float(output_distance(reference, _forward_leaves(gm, data, batch_size), measure))
        layers[name].set_weight_bits(None)
    return names, omega


class JointEvaluator:
    """Exact distance (``measure``, as :func:`layer_sensitivities`; "kl" for logits) of
    configurations of the first layers (the rest stay float), batched.

    ``evaluator(choices)`` with int64 choices [N, g] (index into ``candidates`` for
    layers 0..g-1 of ``names``) returns float64 [N].
    """

    def __init__(self, gm: nn.Module, names: list[str], candidates: tuple[int, ...], data: torch.Tensor,
                 measure: str = "auto"):
        self.gm, self.names, self.candidates, self.data = gm, names, candidates, data
        layers = quant_layers(gm)
        set_act_mode(gm, "off")
        set_weight_bits(gm, None)
        self.reference = _forward_leaves(gm, data, len(data))
        self.measure = resolve_measure(self.reference, measure)
        self.qweights = {}
        for name in names:
            layer = layers[name]
            per_bits = []
            for bits in candidates:
                layer.set_weight_bits(bits)
                per_bits.append(layer.quantized_weight().detach().clone())
            layer.set_weight_bits(None)
            self.qweights[name] = torch.stack(per_bits)  # [B, *weight.shape]
        self.calls = 0
        self.configurations = 0
        self.vmapped = True  # False once the model failed under torch.func.vmap (then: a loop)

    @torch.no_grad()
    def __call__(self, choices) -> np.ndarray:
        choices = torch.as_tensor(np.asarray(choices), dtype=torch.int64)
        if choices.ndim != 2 or choices.shape[1] > len(self.names):
            raise ValueError(f"choices must be [N, g] with g <= {len(self.names)}, got {tuple(choices.shape)}")
        self.calls += 1
        self.configurations += len(choices)
        g = choices.shape[1]
        chunk = max(1, JOINT_EVAL_IMAGES_PER_CHUNK // len(self.data))
        out = []

        def run(params, x):
            return functional_call(self.gm, params, (x,))

        for start in range(0, len(choices), chunk):
            block = choices[start:start + chunk]
            params = {f"{name}.weight": self.qweights[name][block[:, j]] for j, name in enumerate(self.names[:g])}
            leaves = self._batched_outputs(run, params, len(block))
            out.append(output_distance(self.reference, leaves, self.measure))
        return torch.cat(out).numpy() if out else np.zeros(0)

    def _batched_outputs(self, run, params: dict, rows: int) -> list:
        """Output leaves [rows, images, ...]: one vmapped forward, or, for a model that cannot run
        under vmap (e.g. ``.view`` of a tensor vmap leaves non-contiguous), one forward per row.
        The choice is made once per evaluator, so a model always takes the same path."""
        if self.vmapped:
            try:
                return output_leaves(vmap(run, in_dims=({k: 0 for k in params}, None))(params, self.data))
            except RuntimeError:
                self.vmapped = False
        return [torch.stack(rows_of_leaf) for rows_of_leaf in
                zip(*(output_leaves(run({k: v[r] for k, v in params.items()}, self.data)) for r in range(rows)))]
