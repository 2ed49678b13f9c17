"""ZeroQ sensitivity (Eq. 2): KL(FP output || output with some layers' weights quantized).

    Omega_i(k) = 1/N sum_j KL(softmax(M(x_j)) || softmax(M_i^k(x_j)))

averaged over the calibration batch, activations kept in float. ``JointEvaluator``
measures the same quantity for several layers quantized at once, for many
configurations in one batched (``torch.func.vmap``) forward pass — the exact
re-evaluation step of the Appendix-A grouped search.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from tqdm import tqdm

from .modules import quant_layers, set_act_mode, set_weight_bits

# Images x configurations per vmapped forward; bounds the memory of the exact re-evaluation.
JOINT_EVAL_IMAGES_PER_CHUNK = 4096


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch (dim -2) of KL(softmax(reference) || softmax(logits)); float64."""
    p_log = F.log_softmax(reference_logits.double(), dim=-1)
    q_log = F.log_softmax(logits.double(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean(-1)


@torch.no_grad()
def _forward(model: nn.Module, data: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(data[i:i + batch_size]) for i in range(0, len(data), batch_size)])


@torch.no_grad()
def layer_sensitivities(gm: nn.Module, data: torch.Tensor, candidates: tuple[int, ...],
                        batch_size: int = 256, progress: bool = False) -> tuple[list[str], np.ndarray]:
    """Omega[i, b] for every quantized layer i and candidate bit width b (activations float)."""
    layers = quant_layers(gm)
    set_act_mode(gm, "off")
    set_weight_bits(gm, None)
    reference = _forward(gm, data, batch_size)
    names = list(layers)
    omega = np.zeros((len(names), len(candidates)), dtype=np.float64)
    for i, name in enumerate(tqdm(names, desc="sensitivity", disable=not progress, leave=False)):
        for b, bits in enumerate(candidates):
            layers[name].set_weight_bits(bits)
            omega[i, b] = float(kl_divergence(reference, _forward(gm, data, batch_size)))
        layers[name].set_weight_bits(None)
    return names, omega


class JointEvaluator:
    """Exact KL of configurations of the first layers (the rest stay float), batched.

    ``evaluator(choices)`` with int64 choices [N, g] (index into ``candidates`` for
    layers 0..g-1 of ``names``) returns float64 [N].
    """

    def __init__(self, gm: nn.Module, names: list[str], candidates: tuple[int, ...], data: torch.Tensor):
        self.gm, self.names, self.candidates, self.data = gm, names, candidates, data
        layers = quant_layers(gm)
        set_act_mode(gm, "off")
        set_weight_bits(gm, None)
        self.reference = _forward(gm, data, len(data))
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
            logits = self._batched_logits(run, params, len(block))
            out.append(kl_divergence(self.reference.expand_as(logits), logits))
        return torch.cat(out).numpy() if out else np.zeros(0)

    def _batched_logits(self, run, params: dict, rows: int) -> torch.Tensor:
        """[rows, images, classes]: one vmapped forward, or, for a model that cannot run under
        vmap (e.g. ``.view`` of a tensor vmap leaves non-contiguous), one forward per row.
        The choice is made once per evaluator, so a model always takes the same path."""
        if self.vmapped:
            try:
                return vmap(run, in_dims=({k: 0 for k in params}, None))(params, self.data)
            except RuntimeError:
                self.vmapped = False
        return torch.stack([run({k: v[r] for k, v in params.items()}, self.data) for r in range(rows)])
