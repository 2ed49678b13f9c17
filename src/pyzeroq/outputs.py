"""What a model returns, and how far a quantized model's output lies from the float one's.

A model may return one float tensor [N, ...] or a (nested) tuple / list / dict (string keys)
of them, every tensor with the batch in dim 0: class logits [N, K], a segmentation map
[N, K, H, W], a detector's dict of head outputs.

Sensitivity measures (``QuantConfig.sensitivity``), each a distance d(reference, output)
averaged over the batch, smaller is closer:

``"kl"``
    ZeroQ Eq. 2: ``1/N sum_j KL(softmax(ref_j) || softmax(out_j))`` over the last dim; only for
    a model returning one logits tensor [N, K].
``"mse"``
    the squared error of every returned tensor normalised by that tensor's variance over the
    batch (so tensors of different scale weigh alike), summed over the tensors:
    ``sum_t mean((out_t - ref_t)^2) / max(var(ref_t), VARIANCE_FLOOR)`` — a scale-free
    output-matching loss of the kind used for non-classification outputs (e.g. the normalised
    MSE of BRECQ-style reconstruction and of detection distillation).
``"auto"``
    "kl" for one 2-D tensor (logits), else "mse".

Every distance is computed in float64. With a leading configuration dim (the batched
re-evaluation of the grouped search: output leaves [R, N, ...] against reference [N, ...])
the result is [R].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SENSITIVITY_MEASURES", "LOGITS_RANK", "VARIANCE_FLOOR", "tree_items", "tree_map", "output_leaves", "check_output",
           "resolve_measure", "output_distance", "kl_divergence", "concat_outputs"]

SENSITIVITY_MEASURES = ("auto", "kl", "mse")
LOGITS_RANK = 2  # [N, classes]
# a constant output tensor (variance 0) is normalised by this instead (its MSE stays finite)
VARIANCE_FLOOR = 1e-12


def tree_items(obj, leaf_type, what: str = "an output", leaf_name: str = "tensor", path: tuple = ()) -> list:
    """[(path, leaf)] of a structure of ``leaf_type`` leaves in tuples / lists / dicts, in order
    (dict values in insertion order; ``path``: the keys / indices to the leaf). The one walker
    behind the model outputs (tensors), the fx output node (nodes) and the integer plan's
    output (slot names). TypeError "<what> must be a <leaf_name> or a tuple / list / dict of
    <leaf_name>s" for anything else."""
    if isinstance(obj, leaf_type):
        return [(path, obj)]
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        raise TypeError(f"{what} must be a {leaf_name} or a tuple / list / dict of {leaf_name}s, "
                        f"got {type(obj).__name__}")
    return [item for k, v in items for item in tree_items(v, leaf_type, what, leaf_name, path + (k,))]


def tree_map(obj, leaf_type, fn):
    """The structure with every ``leaf_type`` leaf replaced by ``fn(leaf)``: dicts stay dicts,
    lists lists, tuples (a named tuple too) become plain tuples; TypeError as :func:`tree_items`."""
    if isinstance(obj, leaf_type):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: tree_map(v, leaf_type, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return (list if isinstance(obj, list) else tuple)(tree_map(v, leaf_type, fn) for v in obj)
    tree_items(obj, leaf_type)  # raises the TypeError
    return obj


def output_leaves(out) -> list:
    """The tensors of an output structure in order (dict values in insertion order); TypeError
    for anything but tensors, tuples, lists and dicts."""
    return [t for _, t in tree_items(out, torch.Tensor, "a model output")]


def check_output(out, batch: int, argument: str) -> list:
    """The leaves of a model's output on a batch of ``batch`` samples; ValueError (naming
    ``argument``, the input that produced it) unless every leaf is a float tensor [batch, ...]
    and dict keys are strings."""
    try:
        leaves = output_leaves(out)
    except TypeError as exc:
        raise ValueError(f"model must return a float tensor, or a tuple / list / dict of them: {exc}") from None
    if not leaves:
        raise ValueError("model returns no tensor")
    if isinstance(out, dict) and not all(isinstance(k, str) for k in out):
        raise ValueError(f"a dict returned by the model needs string keys, got {list(out)!r}")
    for t in leaves:
        if not t.is_floating_point():
            raise ValueError(f"model must return float tensors, got {t.dtype}")
        if t.dim() < 1 or t.shape[0] != batch:
            raise ValueError(f"{argument} does not fit the model: a batch of {batch} gave an output of shape "
                             f"{tuple(t.shape)}, not [{batch}, ...] (is the channel dimension missing from the "
                             "sample shape?)")
    return leaves


def resolve_measure(leaves: list, measure: str) -> str:
    """"kl" or "mse" for a model returning ``leaves`` (ValueError for "kl" on anything but one
    logits tensor [N, K] with K >= 2: a softmax over one logit is always 1, every KL 0)."""
    if measure not in SENSITIVITY_MEASURES:
        raise ValueError(f"sensitivity must be one of {SENSITIVITY_MEASURES}, got {measure!r}")
    logits = len(leaves) == 1 and leaves[0].dim() == LOGITS_RANK and leaves[0].shape[-1] > 1
    if measure == "kl" and not logits:
        raise ValueError("sensitivity='kl' needs a model returning one logits tensor [N, classes >= 2]; this one returns "
                         f"{len(leaves)} tensor(s) of shapes {[tuple(t.shape) for t in leaves]}: use 'mse' or 'auto'")
    if measure == "auto":
        return "kl" if logits else "mse"
    return measure


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch (dim -2) of KL(softmax(reference) || softmax(logits)); float64."""
    p_log = F.log_softmax(reference_logits.double(), dim=-1)
    q_log = F.log_softmax(logits.double(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean(-1)


def _normalised_mse(reference: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    ref, out = reference.double(), output.double()
    dims = tuple(range(out.dim() - ref.dim(), out.dim()))  # the sample dims (after a configuration dim)
    var = ref.var(unbiased=False).clamp_min(VARIANCE_FLOOR)
    return ((out - ref) ** 2).mean(dim=dims) / var


def output_distance(reference: list, output: list, measure: str) -> torch.Tensor:
    """d(reference, output) of the module docstring; ``reference`` / ``output``: leaf lists
    (:func:`output_leaves`), output leaves optionally with a leading configuration dim.
    ``measure``: "kl" or "mse" (:func:`resolve_measure`). float64, shape () or [R]."""
    if len(reference) != len(output):
        raise ValueError(f"output has {len(output)} tensors, the reference {len(reference)}")
    if measure == "kl":  # the reference expanded over a configuration dim, as ZeroQ's batched evaluation
        return kl_divergence(reference[0].expand_as(output[0]), output[0])
    if measure != "mse":
        raise ValueError(f"measure must be 'kl' or 'mse', got {measure!r}")
    return sum(_normalised_mse(r, o) for r, o in zip(reference, output))


def concat_outputs(chunks: list) -> list:
    """Leaf lists of consecutive batches -> one leaf list (each leaf concatenated along dim 0)."""
    return [torch.cat(parts) for parts in zip(*chunks)]
