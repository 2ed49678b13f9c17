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

import contextlib
import copy
import io
import math
import numbers
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.func import vmap
from tqdm import tqdm

from .graph_split import Cut, cut, model_inputs, stage, tensor_nodes
from .modules import act_quants, quant_layers, set_act_mode, set_weight_bits
from .outputs import concat_outputs, kl_divergence, output_distance, output_leaves, resolve_measure

__all__ = ["layer_sensitivities", "JointEvaluator", "kl_divergence"]

# Images x configurations per vmapped forward of the exact re-evaluation: bounds its memory. Small
# batches stay in cache (4096 ran 3-4x slower per configuration on ResNet-20 / MobileNetV2).
JOINT_EVAL_IMAGES_PER_CHUNK = 64
# Images x prefixes whose frontier activations (what the decided layers alone determine) are held at once.
JOINT_EVAL_PREFIX_IMAGES = 1024
# Which kernel a conv takes depends on the batch: on one thread PyTorch runs a 1x1 stride-1 conv through
# its native kernel below this many images and through oneDNN from it on, and one configuration's conv
# under vmap is an ungrouped oneDNN conv, several a grouped one; their float results differ in the last
# bits. So that each configuration takes the kernels it takes in a large batch whatever the chunking, a
# vmapped forward of a call with several rows holds at least 2 configurations and this many images (a
# short chunk is padded with repeated rows); a call with one row runs alone.
ONEDNN_MIN_BATCH = 16
# Float types the exact re-evaluation can run in (QuantConfig.mp_eval_dtype).
EVAL_DTYPES = (torch.float32, torch.float64)
# Layouts of the exact re-evaluation's float32 conv weights. Several configurations of a conv under vmap
# are one grouped conv; on NCHW oneDNN reorders it to a blocked layout and back at every call: ResNet-20's
# 16-channel convs run 4x faster on channels_last (NHWC), its wider ones ~10 % (bench/grouped_search_speed.py).
EVAL_MEMORY_FORMATS = (torch.channels_last, torch.contiguous_format)
CHANNELS_LAST_PARAM_DIMS = 4  # conv2d weights [out channels, in channels, kh, kw]
CHANNELS_LAST_ROW_DIMS = 5  # [rows, out channels, in channels, kh, kw]: conv2d weights per configuration
# The torch warning that vmap falls back to a per-configuration loop for ``as_strided_`` (adaptive
# pooling resizes a channels_last output with it): correct, and a negligible share of the time.
AS_STRIDED_FALLBACK_WARNING = "There is a performance drop because we have not yet implemented the batching rule"


@torch.no_grad()
def _forward_leaves(model: nn.Module, data: torch.Tensor, batch_size: int) -> list:
    return concat_outputs([output_leaves(model(data[i:i + batch_size])) for i in range(0, len(data), batch_size)])


@torch.no_grad()
def layer_sensitivities(gm: nn.Module, data: torch.Tensor, candidates: tuple[int, ...],
                        batch_size: int = 256, progress: bool = False,
                        measure: str = "auto", act_quant: bool = False) -> tuple[list[str], np.ndarray]:
    """Omega[i, b] for every quantized layer i and candidate bit width b (activations float):
    the distance ``measure`` (:mod:`pyzeroq.outputs`: "kl" = ZeroQ Eq. 2 on logits, "mse" =
    variance-normalised squared error summed over the returned tensors, "auto") between the
    float model's output and the output with layer i's weights at b bits.

    act_quant: activation-aware sensitivity -- the perturbed outputs run with the activation
    quantizers quantizing (they must be calibrated: mode "quantize"), the reference stays the
    float model; every layer then pays the same activation error, and Omega_i(b) measures what
    b-bit weights add to it (what matters at low-bit activations, where the two interact)."""
    layers = quant_layers(gm)
    if act_quant:
        _check_calibrated(gm)
    set_act_mode(gm, "off")
    set_weight_bits(gm, None)
    reference = _forward_leaves(gm, data, batch_size)
    measure = resolve_measure(reference, measure)
    if act_quant:
        set_act_mode(gm, "quantize")
    names = list(layers)
    omega = np.zeros((len(names), len(candidates)), dtype=np.float64)
    for i, name in enumerate(tqdm(names, desc="sensitivity", disable=not progress, leave=False)):
        for b, bits in enumerate(candidates):
            layers[name].set_weight_bits(bits)
            omega[i, b] = float(output_distance(reference, _forward_leaves(gm, data, batch_size), measure))
        layers[name].set_weight_bits(None)
    return names, omega


def _check_calibrated(gm: nn.Module) -> None:
    if not any(q.mode == "quantize" for q in act_quants(gm).values()):
        raise ValueError("act_quant=True needs calibrated activation quantizers (mode 'quantize')")


def _per_candidate(layer: nn.Module, candidates: tuple[int, ...], attr: str, dtype: torch.dtype) -> torch.Tensor:
    """[B, ...]: ``layer.<attr>()`` with the weights at each candidate's bits (``quantized_weight``,
    or ``quantized_bias``: the int32 bias the integer model holds, codes x input scale x weight
    scale, when the layer's input is quantized), cast to ``dtype``; the layer's weights float after."""
    per_bits = []
    for bits in candidates:
        layer.set_weight_bits(bits)
        per_bits.append(getattr(layer, attr)().detach().clone().to(dtype))
    layer.set_weight_bits(None)
    return torch.stack(per_bits)


def _channels_last_graph(gm: fx.GraphModule, sample: torch.Tensor) -> fx.GraphModule | None:
    """A copy of ``gm`` with its 4-D parameters (conv2d weights) channels_last, so that every conv
    runs oneDNN's NHWC kernel whatever the layout of its input (the kernel, and with it the float
    bits, does not then depend on how an activation was stored); None when a forward on
    ``sample`` fails with them (e.g. the model calls ``.view`` on a spatial activation)."""
    nhwc = copy.deepcopy(gm)
    for p in nhwc.parameters():
        if p.dim() == CHANNELS_LAST_PARAM_DIMS:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    try:  # quietly: a failing torch.fx.GraphModule prints its generated code to stderr
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            nhwc(sample)
    except Exception:  # the model's own error, whatever its type
        return None
    return nhwc


def _channels_last_rows(weights: torch.Tensor) -> torch.Tensor:
    """Conv2d weights per row [R, O, C, kh, kw] stored with C innermost ([R, O, kh, kw, C] in
    memory): vmap's grouped reshape to [R*O, C, kh, kw] is then a channels_last view, which
    sends the conv (and the activations after it) to oneDNN's NHWC kernels. Other ranks as given."""
    if weights.dim() != CHANNELS_LAST_ROW_DIMS:
        return weights
    return weights.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def _empty_like_rows(v: torch.Tensor, rows: int) -> torch.Tensor:
    """An empty tensor of ``v``'s shape with ``rows`` rows (dim 0) in ``v``'s memory layout: the
    same dim order and the same strides on size-1 dims. Activations cross a cut in the layout
    they had inside vmap, so that the ops after it (whose kernel can depend on the layout, e.g.
    a 1x1 conv: NHWC or NCHW) take the kernels of an evaluation of the whole graph."""
    shape = (rows, *v.shape[1:])
    out = torch.empty_permuted(shape, sorted(range(v.dim()), key=lambda d: -v.stride(d)),
                               dtype=v.dtype, device=v.device)
    return out.as_strided(shape, [v.stride(d) if n == 1 else out.stride(d) for d, n in enumerate(shape)])


def _rows(v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``v[index]`` (rows along dim 0) in ``v``'s layout (:func:`_empty_like_rows`)."""
    if v.stride(0) == 0:  # rows expanded from one forward
        return v.index_select(0, index)
    return torch.index_select(v, 0, index, out=_empty_like_rows(v, len(index)))


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)`` in the layout of ``parts[0]`` (:func:`_empty_like_rows`)."""
    if parts[0].stride(0) == 0:
        return torch.cat(parts)
    return torch.cat(parts, out=_empty_like_rows(parts[0], sum(len(p) for p in parts)))


class _PrefixTree(NamedTuple):
    """Distinct prefixes of a call's rows at increasing ``decided`` levels."""

    keys: list  # per level k: [U_k, d_k] int64 distinct prefixes (choices of layers 0..d_k-1), lexicographic
    parent: list  # per level k: [U_k] int64 its node at level k-1 (0: the root), non-decreasing
    owner: np.ndarray  # [N] int64 each row's node at the last level (0: the root)


def _prefix_tree(choices: np.ndarray, levels: list[int]) -> _PrefixTree:
    keys, parent, node = [], [], np.zeros(len(choices), dtype=np.int64)
    for d in levels:
        k, first, inverse = np.unique(choices[:, :d], axis=0, return_index=True, return_inverse=True)
        keys.append(k)
        parent.append(node[first])
        node = inverse.reshape(-1)
    return _PrefixTree(keys, parent, node)


class JointEvaluator:
    """Exact KL of configurations of the first layers (the rest stay float), batched.

    ``evaluator(choices, decided=0)`` with int64 choices [N, g] (index into ``candidates``
    for layers 0..g-1 of ``names``, graph order) returns float64 [N]: the KL (Eq. 2, mean
    over ``data``) of the model with those layers' weights quantized, activations float.

    ``decided``: rows sharing their first ``decided`` choices (the prefixes that the
    grouped search keeps) share what those layers alone determine
    (:mod:`pyzeroq.graph_split`): it is computed once per distinct prefix, and only the
    rest of the graph once per row. The ``decided`` values of earlier calls (the grouped
    search's group boundaries) cut the prefixes further: the layers before such a level
    run once per distinct prefix up to it (a tree walked depth first). Configurations run
    under ``torch.func.vmap``, ``JOINT_EVAL_IMAGES_PER_CHUNK`` images x configurations per
    forward; each level holds the cut activations of ``JOINT_EVAL_PREFIX_IMAGES`` images
    x prefixes at a time: the memory does not grow with N.

    Every row takes the same float operations whatever ``decided``, the earlier calls, N
    and the chunking: vmap batches configurations along the group / batch dimensions of
    the same kernels, and a forward holds at least 2 configurations and
    ``ONEDNN_MIN_BATCH`` images (padded) unless the call has one row, so that PyTorch
    picks the kernels it picks for a large batch. The values are therefore bit-identical
    to an evaluation of the whole graph in large chunks (the code of commit c868dd5). A
    model that fails under vmap (e.g. ``.view`` of a tensor vmap leaves non-contiguous)
    is run one configuration at a time instead, from then on (then bit-identical to one
    plain forward per configuration).

    ``dtype``: torch.float32 (default) or torch.float64, the float type of the evaluation (a
    float64 copy of ``gm`` runs it; the quantized weights are exact in either).

    ``memory_format``: the layout of the float32 conv2d weights (a copy of ``gm`` holds them).
    ``torch.channels_last`` (default) sends every conv of the evaluation to oneDNN's NHWC
    kernels: its 16-channel convs run 4x faster, the whole ResNet-20 search ~1.1x; ``torch.contiguous_format``
    runs the NCHW kernels of commit c868dd5, bit for bit. The two differ in the last float bits
    (KL ~1e-7 relative); the bit-identity above holds within either. A model whose forward fails
    on channels_last activations (e.g. ``.view`` on a spatial activation), a float64 evaluation
    and an activation-aware one (where last-bit differences flip activation codes: it stays bit
    for bit the model's own forward) run NCHW; ``self.memory_format`` says which ran.

    ``act_quant``: activation-aware evaluation (as :func:`layer_sensitivities`'s ``act_quant``):
    the configurations run with the (calibrated, mode "quantize") activation quantizers
    quantizing, the reference stays the float model. The activation fake quantization is a
    C++ kernel that ``vmap`` cannot batch, so such a model is evaluated one configuration at
    a time (the loop above), still sharing the decided prefixes. ValueError when no
    activation quantizer is calibrated.

    Use as a context manager (or call :meth:`close`) to close the progress bar
    (``progress``: a tqdm bar counting configurations). Raises TypeError when ``gm`` is not
    a ``torch.fx.GraphModule`` (:func:`pyzeroq.modules.prepare` makes one), ValueError for
    choices not [N, g] with g <= len(names), or ``decided`` outside 0..g.
    """

    def __init__(self, gm: fx.GraphModule, names: list[str], candidates: tuple[int, ...], data: torch.Tensor,
                 progress: bool = False, measure: str = "auto", dtype: torch.dtype = torch.float32,
                 act_quant: bool = False, memory_format: torch.memory_format = torch.channels_last):
        if not isinstance(gm, fx.GraphModule):
            raise TypeError(f"gm must be a torch.fx.GraphModule (pyzeroq.modules.prepare), got {type(gm).__name__}")
        if dtype not in EVAL_DTYPES:
            raise ValueError(f"dtype must be one of {EVAL_DTYPES}, got {dtype!r}")
        if memory_format not in EVAL_MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {EVAL_MEMORY_FORMATS}, got {memory_format!r}")
        if act_quant:
            _check_calibrated(gm)
        self.names, self.candidates = list(names), candidates
        layers = quant_layers(gm)
        set_act_mode(gm, "off")
        set_weight_bits(gm, None)
        # [B, *weight.shape] per layer, exact in float64
        self.qweights = {name: _per_candidate(layers[name], candidates, "quantized_weight", dtype)
                         for name in self.names}
        if dtype != torch.float32:  # a float64 copy; the caller's graph stays as it is
            gm = copy.deepcopy(gm).to(dtype)
        self.memory_format = torch.contiguous_format  # the layout the evaluation runs in
        if dtype == torch.float32 and memory_format == torch.channels_last and not act_quant:
            nhwc = _channels_last_graph(gm, data[:1])
            if nhwc is not None:  # else the model fails on channels_last activations: NCHW
                gm, self.memory_format = nhwc, torch.channels_last
                self.qweights = {name: _channels_last_rows(w) for name, w in self.qweights.items()}
        self.gm, self.data = gm, data.to(dtype)
        self.reference = _forward_leaves(gm, self.data, len(self.data))
        self.measure = resolve_measure(self.reference, measure)
        self.act_quant = act_quant
        self.qbiases = {}
        if act_quant:
            set_act_mode(gm, "quantize")
            layers = quant_layers(gm)  # the float64 copy's layers when dtype is float64
            self.qbiases = {name: _per_candidate(layers[name], candidates, "quantized_bias", dtype)
                            for name in self.names if layers[name].bias is not None}
        self._tensors = tensor_nodes(gm, self.data)
        self._cuts: dict[int, Cut] = {}
        self._stages: dict[tuple, fx.GraphModule] = {}
        self._held: dict[fx.GraphModule, set[str]] = {}  # per stage: the names of its parameters
        self._levels: set[int] = set()  # decided values of earlier calls
        self._bar = tqdm(total=0, desc="grouped search", unit="config", disable=not progress, leave=False)
        self.calls = 0
        self.configurations = 0
        self.vmapped = not act_quant  # False once the model failed under torch.func.vmap (then: a loop)

    def __enter__(self) -> "JointEvaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the progress bar (and turn activation quantization off again after ``act_quant``)."""
        self._bar.close()
        if self.act_quant:
            set_act_mode(self.gm, "off")

    @torch.no_grad()
    def __call__(self, choices, decided: int = 0) -> np.ndarray:
        choices = np.asarray(choices).astype(np.int64)
        if choices.ndim != 2 or choices.shape[1] > len(self.names):
            raise ValueError(f"choices must be [N, g] with g <= {len(self.names)}, got {choices.shape}")
        if isinstance(decided, bool) or not isinstance(decided, numbers.Integral) or \
                not 0 <= decided <= choices.shape[1]:
            raise ValueError(f"decided must be an integer in [0, {choices.shape[1]}] (columns of choices), "
                             f"got {decided!r}")
        self.calls += 1
        self.configurations += len(choices)
        if len(choices) == 0:
            return np.zeros(0)
        levels = sorted(d for d in self._levels if 0 < d < decided) + ([int(decided)] if decided else [])
        self._levels.add(int(decided))
        self._bar.total += len(choices)
        self._bar.refresh()
        done = self._bar.n
        if self.vmapped:
            try:
                return self._evaluate(choices, levels, vmapped=True)
            except RuntimeError:
                self.vmapped = False
                self._bar.n = done
        return self._evaluate(choices, levels, vmapped=False)

    def _cut(self, decided: int | None) -> Cut:
        if decided is None:
            return model_inputs(self.gm)
        if decided not in self._cuts:
            self._cuts[decided] = cut(self.gm, self.names, decided, self._tensors)
        return self._cuts[decided]

    def _stage(self, start: int | None, end: int | None) -> fx.GraphModule:
        """The graph from level ``start`` (None: the model input) to ``end`` (None: the output)."""
        if (start, end) not in self._stages:
            self._stages[start, end] = stage(self.gm, self._cut(start), None if end is None else self._cut(end))
        return self._stages[start, end]

    def _evaluate(self, choices: np.ndarray, levels: list[int], vmapped: bool) -> np.ndarray:
        tree = _prefix_tree(choices, levels)
        min_rows = 1 if len(choices) == 1 else max(2, math.ceil(ONEDNN_MIN_BATCH / len(self.data)))
        call = _Call(choices, levels, tree, np.argsort(tree.owner, kind="stable"), vmapped, min_rows,
                     max(min_rows, JOINT_EVAL_IMAGES_PER_CHUNK // len(self.data)),
                     max(1, JOINT_EVAL_PREFIX_IMAGES // len(self.data)), np.empty(len(choices)))
        self._descend(call, 0, [self.data] if vmapped else [(self.data,)], 0, 1)
        return call.out

    def _descend(self, call: "_Call", k: int, values: list, p0: int, p1: int) -> None:
        """Evaluate everything below the nodes p0..p1-1 of level k-1 (the root for k = 0), whose
        cut values are ``values`` (vmapped: per cut node [p1 - p0, ...] or unbatched; else
        per node the tuple of cut values)."""
        start = call.levels[k - 1] if k else None
        start_varies = self._cut(start).varies
        if k == len(call.levels):  # the rows: the rest of the graph and the KL
            owners = call.tree.owner[call.order]
            lo, hi = np.searchsorted(owners, [p0, p1])
            for r0 in range(lo, hi, call.rows_per_chunk):
                r = call.order[r0:min(hi, r0 + call.rows_per_chunk)]
                outs = self._run(call, self._stage(start, None), start_varies, (True,) * len(self.reference),
                                 values, call.tree.owner[r] - p0, call.choices[r])
                leaves = outs if call.vmapped else [torch.stack(leaf) for leaf in zip(*outs)]
                call.out[r] = output_distance(self.reference, leaves, self.measure).numpy()
                self._bar.update(len(r))
            return
        parent, end = call.tree.parent[k], call.levels[k]
        c0, c1 = np.searchsorted(parent, [p0, p1])
        for c in range(c0, c1, call.nodes_per_chunk):
            cc = min(c1, c + call.nodes_per_chunk)
            child = self._run(call, self._stage(start, end), start_varies, self._cut(end).varies, values,
                              parent[c:cc] - p0, call.tree.keys[k][c:cc])
            self._descend(call, k + 1, child, c, cc)

    def _params(self, module: nn.Module, choices: np.ndarray) -> dict:
        """{layer.weight: the quantized weights of the rows [R, *weight.shape]} for the layers
        of ``choices``' columns that ``module`` holds."""
        if module not in self._held:
            self._held[module] = {name for name, _ in module.named_parameters()}
        held = self._held[module]
        index = torch.as_tensor(choices)
        params = {f"{name}.weight": self.qweights[name][index[:, j]]
                  for j, name in enumerate(self.names[:choices.shape[1]]) if f"{name}.weight" in held}
        params.update({f"{name}.bias": self.qbiases[name][index[:, j]]
                       for j, name in enumerate(self.names[:choices.shape[1]])
                       if name in self.qbiases and f"{name}.bias" in held})
        return params

    def _run(self, call: "_Call", module: fx.GraphModule, in_varies: tuple, out_varies: tuple, values: list,
             parents: np.ndarray, keys: np.ndarray):
        """``module`` for each of C configurations (``keys`` [C, d]) on its parent's values
        (``parents`` [C] into ``values``). vmapped: per output [C, ...] (or unbatched when it does
        not vary), in forwards of ``rows_per_chunk`` padded to ``min_rows`` rows; else per
        configuration the tuple of outputs (one plain forward each)."""
        run = lambda p, *x: _call_with(module, p, x)
        if not call.vmapped:
            return [run({k: v[0] for k, v in self._params(module, keys[i:i + 1]).items()}, *values[int(parents[i])])
                    for i in range(len(keys))]
        parts = []
        for i in range(0, len(keys), call.rows_per_chunk):
            block = np.arange(i, min(len(keys), i + call.rows_per_chunk))
            padded = np.resize(block, max(len(block), call.min_rows))
            params = self._params(module, keys[padded])
            index = torch.as_tensor(parents[padded])
            args = [_rows(v, index) if varies else v for v, varies in zip(values, in_varies)]
            if params or any(in_varies):
                in_dims = ({k: 0 for k in params}, *(0 if varies else None for varies in in_varies))
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=AS_STRIDED_FALLBACK_WARNING)
                    outs = vmap(run, in_dims=in_dims)(params, *args)
            else:  # nothing varies (no layer chosen yet): one plain forward
                outs = [o.expand(len(padded), *o.shape) for o in run(params, *args)]
            parts.append([o[:len(block)] for o in outs])
        return [_cat_rows([part[j] for part in parts]) if varies else parts[0][j][0]
                for j, varies in enumerate(out_varies)]


def _call_with(module: nn.Module, params: dict, args: tuple):
    """``module(*args)`` with the tensors ``params`` ({"path.to.layer.weight": tensor}) in place
    of those parameters for the call, restored after it (also on an exception): the effect of
    ``torch.func.functional_call`` for plain parameters (no tying, no parametrization: the
    evaluator's own stage graphs), without its walk over the whole module tree at every call
    (~0.35 ms; ~2,000 calls in the README's grouped search). Works under ``vmap`` (the swapped
    values are then batched tensors)."""
    saved = []
    try:
        for key, value in params.items():
            path, _, attr = key.rpartition(".")
            owner = module.get_submodule(path)
            saved.append((owner, attr, owner._parameters[attr]))
            owner._parameters[attr] = value
        return module(*args)
    finally:
        for owner, attr, old in reversed(saved):
            owner._parameters[attr] = old


class _Call(NamedTuple):
    """One evaluator call: its rows, their prefix tree and the chunking."""

    choices: np.ndarray
    levels: list
    tree: _PrefixTree
    order: np.ndarray  # rows sorted by their last-level node
    vmapped: bool
    min_rows: int
    rows_per_chunk: int
    nodes_per_chunk: int
    out: np.ndarray
