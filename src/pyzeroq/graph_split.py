"""Cut a traced model at the layers already decided, for the Appendix-A grouped search.

The grouped search (:func:`pyzeroq.pareto.grouped_search`) evaluates many weight
configurations of the layers ``0..g-1`` (graph order) that share the choices of the
first ``decided`` layers: they combine a few kept prefixes with many configurations of
the next group. Everything computed from the decided layers alone is the same for all
configurations sharing a prefix, so it is computed once per prefix.

A node of the fx graph is *decided* when none of its ancestors (itself included) is a
call of a layer with index ``>= decided``; the rest is *undecided*. This is a property of
the data flow, not of the node order, so any graph (residual adds, concatenations,
branches reading the input beside the first layers) cuts correctly:

* the *rest*: the undecided nodes, the output, and the decided nodes whose value is not
  a tensor (shapes such as ``x.size(0)``, tuples) or is an attribute (``get_attr``) --
  those are recomputed there, from their own decided tensor inputs;
* the :class:`Cut`: the decided tensor nodes that the rest reads (in graph order).

:func:`stage` builds the graph between two cuts (or from the model input, or to the
model output): the rest of a later cut lies within the rest of an earlier one, so the
cuts at increasing ``decided`` chain the model into stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .outputs import tree_items


@dataclass(frozen=True)
class Cut:
    """The decided tensors that the rest of the graph reads, for the first ``decided`` layers."""

    decided: int
    nodes: tuple[fx.Node, ...]
    varies: tuple[bool, ...]  # per node: depends on a (decided) layer's weights


class _TypeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.tensor_nodes: set[str] = set()

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.tensor_nodes.add(n.name)
        return out


@torch.no_grad()
def tensor_nodes(gm: fx.GraphModule, *inputs) -> frozenset[str]:
    """Names of the nodes of ``gm`` whose value is a tensor, found by one forward on ``inputs``."""
    recorder = _TypeRecorder(gm)
    recorder.run(*inputs)
    return frozenset(recorder.tensor_nodes)


def _classify(nodes: list[fx.Node], layer_index: dict[str, int], decided: int):
    """(undecided nodes, nodes with a layer among their ancestors)."""
    undecided, has_layer = set(), set()
    for n in nodes:
        own = layer_index.get(n.target) if n.op == "call_module" else None
        inputs = n.all_input_nodes
        if (own is not None and own >= decided) or any(a in undecided for a in inputs):
            undecided.add(n)
        if own is not None or any(a in has_layer for a in inputs):
            has_layer.add(n)
    return undecided, has_layer


def _rest(nodes: list[fx.Node], undecided: set, tensors: frozenset[str]) -> set:
    """Undecided nodes and the output, plus (recursively) the decided non-tensor / attribute
    nodes they read."""
    rest = undecided | {n for n in nodes if n.op == "output"}
    for n in reversed(nodes):  # inputs come before their users: one reverse pass closes the set
        if n in rest:
            rest.update(a for a in n.all_input_nodes
                        if a.op == "get_attr" or (a.name not in tensors and a.op != "placeholder"))
    return rest


def cut(gm: fx.GraphModule, layers: list[str], decided: int, tensors: frozenset[str]) -> Cut:
    """The :class:`Cut` of ``gm`` after the first ``decided`` layers of ``layers`` (names of
    call_module targets, in the order the configurations list them; any order works).

    tensors: names of the nodes whose value is a tensor (:func:`tensor_nodes`). Raises
    ValueError when ``decided`` is outside ``0..len(layers)``.
    """
    if not 0 <= decided <= len(layers):
        raise ValueError(f"decided must be in [0, {len(layers)}], got {decided}")
    nodes = list(gm.graph.nodes)
    undecided, has_layer = _classify(nodes, {name: i for i, name in enumerate(layers)}, decided)
    rest = _rest(nodes, undecided, tensors)
    frontier = tuple(n for n in nodes if n not in rest and any(u in rest for u in n.users))
    return Cut(decided, frontier, tuple(n in has_layer for n in frontier))


def model_inputs(gm: fx.GraphModule) -> Cut:
    """The model's inputs as a cut before everything (nothing varies)."""
    nodes = tuple(n for n in gm.graph.nodes if n.op == "placeholder")
    return Cut(0, nodes, (False,) * len(nodes))


def stage(gm: fx.GraphModule, start: Cut, end: Cut | None) -> fx.GraphModule:
    """The part of ``gm`` from the cut ``start`` (placeholders, in its node order) to the cut
    ``end`` (returns the tuple of its node values), or to the model output (``end=None``:
    returns the tuple of the returned tensors, a structured output flattened). ``start`` must be
    :func:`model_inputs` or a cut of a ``decided`` not above ``end``'s. The module shares ``gm``'s submodules, so
    ``functional_call`` with ``gm``'s parameter names works on it.
    """
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if end is not None:
        targets = list(end.nodes)
    else:  # the returned tensors, flattened in pyzeroq.outputs.output_leaves order
        targets = [n for _, n in tree_items(output.args[0], fx.Node, "the graph output", "node")]
    inputs = set(start.nodes)
    needed, stack = set(), list(targets)
    while stack:  # ancestors of the targets, stopping at the start cut
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            if n not in inputs:
                if n.op == "placeholder":
                    raise ValueError(f"stage: cut {start.decided} does not precede the target ({n.name} is "
                                     "needed but is not one of its nodes)")
                stack.extend(n.all_input_nodes)
    graph = fx.Graph()
    env = {n: graph.placeholder(f"cut_{i}") for i, n in enumerate(start.nodes)}
    for n in gm.graph.nodes:
        if n in needed and n not in inputs:
            env[n] = graph.node_copy(n, env.__getitem__)
    if end is not None:
        graph.output(tuple(env[n] for n in end.nodes))
    else:
        graph.output(tuple(env[n] for n in targets))
    return fx.GraphModule(gm, graph)

