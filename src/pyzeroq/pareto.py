"""Mixed-precision bit-width selection: the Pareto solver of ZeroQ (Eq. 4, Appendix A).

A pure solver over arrays; it knows nothing of models. ``sensitivity[l, b]`` is
the (independent) sensitivity of layer ``l`` under option ``b`` (e.g. a bit
width) and ``cost[l, b] >= 0`` its cost: parameters x bits, bytes, BOPs -- any
non-negative additive cost works, nothing assumes ``param * bits``.

Exact vs. binned costs
    With ``bins=None`` the dynamic programs are exact over integer total costs.
    Costs must then be integer-valued (float arrays holding integers are fine).
    They are first reduced without loss: each layer's cheapest option is
    subtracted (a constant) and the remaining extra costs are divided by their
    gcd. If the exact table would be too large, a ``ValueError`` suggests
    ``bins=``. With ``bins=N`` the extra cost of every option is rounded UP
    onto a grid of width ``w = (top - min_total) / N``, where ``top`` is the
    budget (``solve``) or the largest total cost (``frontier``, ``k_best``,
    and ``solve`` when the budget exceeds it): ``qcost = ceil((cost - layer
    minimum) / w)``. Rounding up means the grid estimate never underestimates
    a configuration's cost, so a configuration that fits ``N`` bins fits the
    budget; ``solve`` re-checks its answer against the exact budget anyway.
    Binned results may miss configurations that only fit when costs are not
    rounded (the price of the coarser grid).

Deterministic tie-breaking (all functions)
    Totals are accumulated in float64 from the last layer to the first
    (``s[0] + (s[1] + (... + s[L-1]))``) and compared exactly. Among equal
    totals the lower total (integer/bin) cost wins, then the lexicographically
    smallest choice vector (layer 0 most significant).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from . import _core

__all__ = ["solve", "frontier", "k_best", "grouped_search", "Frontier", "KBest", "GroupedSearchResult"]

# Largest frontier/solve DP table (layers x integer costs); one uint8 backpointer per cell.
MAX_DP_CELLS = 1 << 27
# Largest k_best table (layers x integer costs x k); 5 bytes of backpointers per cell.
MAX_KBEST_CELLS = 1 << 24
# grouped_search enumerates a group's configurations directly up to this many.
MAX_GROUP_ENUMERATION = 1 << 20
# Integers above this are not exactly representable in float64.
_MAX_EXACT_INT = 2**53


class Frontier(NamedTuple):
    """The Pareto frontier: cost ascending, total strictly decreasing."""

    cost: np.ndarray  # [P] float64, exact total cost of each point
    total: np.ndarray  # [P] float64, total sensitivity
    choices: np.ndarray  # [P, L] int64


class KBest(NamedTuple):
    """Up to ``k`` best configurations per reachable total cost (or cost bin)."""

    bin_cost: np.ndarray  # [M] float64: exact total cost, or the bin's upper edge with bins=
    totals: np.ndarray  # [M, k'] float64, ascending per row, +inf padded
    choices: np.ndarray  # [M, k', L] int64, -1 padded
    counts: np.ndarray  # [M] int64, valid entries per row
    config_cost: np.ndarray  # [M, k'] float64 exact total cost per configuration, NaN padded


@dataclass(frozen=True)
class GroupedSearchResult:
    """Outcome of :func:`grouped_search`."""

    choice: np.ndarray  # [L] int64, best exactly evaluated configuration within budget
    total: float  # its exact (evaluate) value
    cost: float  # its exact total cost
    additive: float  # its additive estimate sum_l sensitivity[l, choice[l]]
    kept_bin: np.ndarray  # [M] size bin of each kept full configuration
    kept_choices: np.ndarray  # [M, L]
    kept_totals: np.ndarray  # [M] exact values
    kept_costs: np.ndarray  # [M]
    bin_edges: np.ndarray  # [size_bins + 1] the model-size axis
    groups: tuple  # ((start, end), ...) layer ranges
    evaluations: tuple  # configurations evaluated per group (one evaluate call each)


class _Grid(NamedTuple):
    q: np.ndarray  # int64 [L, B] integer costs for the DP
    capacity: int  # largest integer total cost in the table
    base: float  # sum of each layer's cheapest cost (integer cost 0)
    unit: float  # cost of one integer step (gcd, or bin width)
    exact: bool


# ----------------------------------------------------------------------------- validation


def _validate(sensitivity, cost) -> tuple[np.ndarray, np.ndarray]:
    s = np.ascontiguousarray(np.asarray(sensitivity, dtype=np.float64))
    c = np.ascontiguousarray(np.asarray(cost, dtype=np.float64))
    if s.ndim != 2:
        raise ValueError(f"sensitivity must be 2-D [layers, options], got shape {s.shape}")
    if c.shape != s.shape:
        raise ValueError(f"cost must have the same shape as sensitivity {s.shape}, got {c.shape}")
    if s.shape[0] < 1 or s.shape[1] < 1:
        raise ValueError(f"sensitivity needs at least one layer and one option, got shape {s.shape}")
    if s.shape[1] > _core.pareto_max_options:
        raise ValueError(f"sensitivity has {s.shape[1]} options per layer; at most {_core.pareto_max_options}")
    bad = ~np.isfinite(s)
    if bad.any():
        l, b = np.argwhere(bad)[0]
        raise ValueError(f"sensitivity must be finite; found {s[l, b]} at layer {l}, option {b}")
    bad = ~np.isfinite(c) | (c < 0)
    if bad.any():
        l, b = np.argwhere(bad)[0]
        raise ValueError(f"cost must be finite and non-negative; found {c[l, b]} at layer {l}, option {b}")
    return s, c


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_bins(bins) -> int | None:
    return None if bins is None else _positive_int(bins, "bins")


def _check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be a real number, got {type(budget).__name__}")
    budget = float(budget)
    if math.isnan(budget):
        raise ValueError("budget must not be NaN")
    return budget


def _check_feasible(c: np.ndarray, budget: float) -> None:
    smallest = math.fsum(c.min(axis=1))
    if smallest > budget:
        raise ValueError(
            f"budget {budget!r} is infeasible: the smallest reachable total cost is {smallest!r} "
            "(the cheapest option of every layer)"
        )


# ----------------------------------------------------------------------------- cost grids


def _exact_grid(c: np.ndarray, budget: float | None, k: int = 1, max_cells: int = MAX_DP_CELLS) -> _Grid:
    """Lossless integer costs: subtract each layer's minimum, divide by the gcd."""
    if not np.all(c == np.floor(c)) or c.max() >= _MAX_EXACT_INT:
        raise ValueError("cost must be integer-valued (< 2**53) for the exact DP (bins=None); "
                         "pass bins=N to round non-integer costs onto a grid")
    ci = c.astype(np.int64)
    mins = ci.min(axis=1)
    extra = ci - mins[:, None]
    unit = int(np.gcd.reduce(extra.ravel())) or 1
    q = extra // unit
    base = int(mins.sum(dtype=object))
    capacity = int(q.max(axis=1).sum(dtype=object))
    if budget is not None and budget < base + capacity * unit:
        capacity = (math.floor(budget) - base) // unit
    cells = c.shape[0] * (capacity + 1) * k
    if cells > max_cells:
        raise ValueError(
            f"cost: the exact DP would need {c.shape[0]} layers x {capacity + 1} integer costs"
            + (f" x k={k}" if k > 1 else "") + f" = {cells} cells (limit {max_cells}); "
            "pass bins=N (e.g. bins=10000) to coarsen costs onto a grid"
        )
    return _Grid(np.ascontiguousarray(q), capacity, float(base), float(unit), True)


def _binned_grid(c: np.ndarray, bins: int, budget: float | None, k: int = 1,
                 max_cells: int = MAX_DP_CELLS) -> _Grid:
    """qcost = ceil((cost - layer min) / w), w = (top - min total) / bins (see module doc)."""
    mins = c.min(axis=1)
    extra = c - mins[:, None]
    base = math.fsum(mins)
    largest = math.fsum(c.max(axis=1))
    all_fit = budget is None or budget >= largest
    top = largest if all_fit else budget
    unit = (top - base) / bins
    if not unit > 0:
        q = np.where(extra == 0, 0, bins + 1).astype(np.int64)
        return _Grid(q, 0, base, 0.0, False)
    x = np.minimum(np.ceil(extra / unit), bins + 1)
    x[(x <= bins) & (x * unit < extra)] += 1  # guard against division rounding down
    q = np.ascontiguousarray(x.astype(np.int64))
    capacity = int(q.max(axis=1).sum()) if all_fit else bins
    cells = c.shape[0] * (capacity + 1) * k
    if cells > max_cells:
        raise ValueError(f"bins: the DP would need {cells} cells (limit {max_cells}); use fewer bins")
    return _Grid(q, capacity, base, unit, False)


def _grid(c, bins, budget=None, k=1, max_cells=MAX_DP_CELLS) -> _Grid:
    if bins is None:
        return _exact_grid(c, budget, k, max_cells)
    return _binned_grid(c, bins, budget, k, max_cells)


def check_dp_size(cost, bins: int | None, budget: float | None = None) -> None:
    """ValueError when the DP over ``cost`` [L, B] with ``bins`` (None: exact integer costs) under
    ``budget`` would exceed ``MAX_DP_CELLS`` (what :func:`solve` / :func:`frontier` would raise,
    checked before any costly stage)."""
    _grid(np.asarray(cost, dtype=np.float64), bins, budget)


def _config_cost(c: np.ndarray, choices: np.ndarray) -> np.ndarray:
    """Total cost of each configuration (rows of ``choices``; rows with -1 -> NaN).

    Summed with ``math.fsum`` (correctly rounded, order independent): this is the
    exact cost every budget check uses.
    """
    valid = (choices >= 0).all(axis=-1)
    picked = c[np.arange(c.shape[0]), np.where(choices >= 0, choices, 0)]
    if np.all(c == np.floor(c)) and c.max() * c.shape[0] < _MAX_EXACT_INT:
        sums = picked.sum(axis=-1)  # integer-valued: every partial sum is exact
    else:
        flat = picked.reshape(-1, c.shape[0])
        sums = np.array([math.fsum(row) for row in flat.tolist()], dtype=np.float64).reshape(picked.shape[:-1])
    return np.where(valid, sums, np.nan)


# ----------------------------------------------------------------------------- public solvers


def solve(sensitivity, cost, budget, bins: int | None = None) -> tuple[np.ndarray, float]:
    """Minimize sum_l sensitivity[l, choice[l]] subject to sum_l cost[l, choice[l]] <= budget.

    Returns ``(choice[L] int64, total)`` with ``total`` the DP's float64 sum (see
    the module doc for summation order and the tie-break: lower total cost, then
    lexicographically smallest ``choice``). Exact when ``bins=None`` (integer
    costs); ``bins=N`` rounds extra costs up onto ``N`` bins up to the budget,
    so the answer never exceeds the budget (re-checked exactly) but may be
    slightly suboptimal. Raises ``ValueError`` stating the smallest reachable
    total cost when the budget is infeasible.
    """
    s, c = _validate(sensitivity, cost)
    budget = _check_budget(budget)
    bins = _check_bins(bins)
    _check_feasible(c, budget)
    grid = _grid(c, bins, budget)
    _, totals, choices = _core.pareto_frontier_dp(s, grid.q, grid.capacity, last_only=True)
    if grid.exact or _config_cost(c, choices[-1]) <= budget:
        return choices[-1].copy(), float(totals[-1])
    # Float rounding put the binned optimum a hair over budget: take the best point that fits.
    _, totals, choices = _core.pareto_frontier_dp(s, grid.q, grid.capacity)
    fits = np.flatnonzero(_config_cost(c, choices) <= budget)
    i = fits[-1] if fits.size else 0
    return choices[i].copy(), float(totals[i])


def frontier(sensitivity, cost, bins: int | None = None) -> Frontier:
    """The whole Pareto frontier ``(cost[P] ascending, total[P] strictly decreasing, choices[P, L])``.

    Point ``i`` is ``solve(sensitivity, cost, cost[i])`` (exact mode). With
    ``bins=N`` the DP runs on ``N`` bins up to the largest total cost and the
    points are then filtered to be Pareto-optimal in their exact costs.
    """
    s, c = _validate(sensitivity, cost)
    bins = _check_bins(bins)
    grid = _grid(c, bins)
    qc, totals, choices = _core.pareto_frontier_dp(s, grid.q, grid.capacity)
    if grid.exact:
        return Frontier(grid.base + qc.astype(np.float64) * grid.unit, totals, choices)
    costs = _config_cost(c, choices)
    order = np.lexsort((totals, costs))
    running = np.minimum.accumulate(totals[order])
    keep = order[np.concatenate(([True], totals[order][1:] < running[:-1]))]
    return Frontier(costs[keep], totals[keep], choices[keep])


def k_best(sensitivity, cost, k: int, bins: int | None = None) -> KBest:
    """The ``k`` best configurations for every reachable total cost (exact) or cost bin.

    Rows ``m`` run over reachable integer total costs (``bin_cost`` ascending);
    within a row configurations are sorted by total sensitivity, ties by
    lexicographic choice vector. The row width is ``k' = min(k, B**L)``.
    With ``bins=N`` a row collects the configurations whose rounded-up bin
    costs sum to that bin (``config_cost <= bin_cost``).
    """
    s, c = _validate(sensitivity, cost)
    k = _positive_int(k, "k")
    bins = _check_bins(bins)
    k_eff = min(k, s.shape[1] ** s.shape[0])
    grid = _grid(c, bins, None, k_eff, MAX_KBEST_CELLS)
    qc, totals, choices, counts = _core.pareto_k_best(s, grid.q, grid.capacity, k_eff)
    return KBest(grid.base + qc.astype(np.float64) * grid.unit, totals, choices, counts,
                 _config_cost(c, choices))


# ----------------------------------------------------------------------------- Appendix A


def _lex_order(choices: np.ndarray, *primary: np.ndarray) -> np.ndarray:
    """Indices sorting by ``primary`` keys (first = most significant), then lexicographic rows."""
    keys = [choices[:, j] for j in range(choices.shape[1] - 1, -1, -1)] + list(primary[::-1])
    return np.lexsort(keys) if keys else np.arange(choices.shape[0])


def _rank_within(groups: np.ndarray) -> np.ndarray:
    """For a sorted key array, the position of each entry within its run of equal keys."""
    return np.arange(groups.size) - np.searchsorted(groups, groups, side="left")


def _group_candidates(s: np.ndarray, c: np.ndarray, k: int, bins: int | None):
    """Per exact group cost the ``k`` best group configurations by the additive estimate.

    Returns (choices [X, g], additive value [X], exact cost [X]) sorted lexicographically.
    """
    g, options = s.shape
    n_conf = options**g
    k_eff = min(k, n_conf)
    choices = None
    try:
        grid = _exact_grid(c, None, k_eff, MAX_KBEST_CELLS)
    except ValueError:
        grid = None
    if grid is not None:
        _, totals, ch, _ = _core.pareto_k_best(s, grid.q, grid.capacity, k_eff)
        valid = ch[:, :, 0] >= 0
        choices, values = ch[valid], totals[valid]
    elif n_conf <= MAX_GROUP_ENUMERATION:
        choices = np.indices((options,) * g).reshape(g, -1).T.astype(np.int64)
        values = s[g - 1, choices[:, g - 1]].copy()
        for layer in range(g - 2, -1, -1):  # same summation order as the DP
            values = s[layer, choices[:, layer]] + values
        costs = _config_cost(c, choices)
        order = _lex_order(choices, costs, values)
        keep = order[_rank_within(costs[order]) < k_eff]
        choices, values = choices[keep], values[keep]
    elif bins is not None:
        grid = _binned_grid(c, bins, None, k_eff, MAX_KBEST_CELLS)
        _, totals, ch, _ = _core.pareto_k_best(s, grid.q, grid.capacity, k_eff)
        valid = ch[:, :, 0] >= 0
        choices, values = ch[valid], totals[valid]
    else:
        raise ValueError(
            f"group_size: a group of {g} layers x {options} options has {n_conf} configurations and "
            "costs too large for the exact k-best DP; use a smaller group_size or pass bins=N"
        )
    order = _lex_order(choices)
    choices, values = choices[order], values[order]
    return choices, values, _config_cost(c, choices)


def _call_evaluate(evaluate, prefixes: np.ndarray, **kwargs) -> np.ndarray:
    out = evaluate(prefixes.copy(), **kwargs)
    if hasattr(out, "detach"):  # torch tensor
        out = out.detach().cpu().numpy()
    values = np.asarray(out, dtype=np.float64)
    if values.shape != (prefixes.shape[0],):
        raise ValueError(f"evaluate must return {prefixes.shape[0]} values (one per configuration), "
                         f"got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("evaluate returned NaN or inf")
    return values


def grouped_search(sensitivity, cost, budget, evaluate: Callable[[np.ndarray], np.ndarray],
                   group_size: int = 5, keep_per_bin_estimate: int = 10, size_bins: int = 200,
                   keep_per_bin_exact: int = 5, bins: int | None = None,
                   pass_decided: bool = False) -> GroupedSearchResult:
    """ZeroQ Appendix A: relax the independence assumption of Eq. 4 group by group.

    The paper's four hyperparameters "typically 10, 5, 200, 5" map to:
    ``keep_per_bin_estimate=10`` configurations kept per size bin by the
    additive estimate, ``group_size=5`` consecutive layers per group,
    ``size_bins=200`` intervals of the model-size axis up to the budget, and
    ``keep_per_bin_exact=5`` kept per bin after exact re-evaluation.

    Size axis: a prefix configuration (layers ``0..e-1`` decided) has size
    ``cost(prefix) + sum of the cheapest costs of layers e..L-1`` -- the
    smallest model it can still become. The axis ``[min total, budget]`` (the
    budget capped at the largest total cost) is split into ``size_bins`` equal
    intervals. A prefix whose size exceeds the budget cannot be completed and
    is dropped (the feasibility rule).

    Procedure, for each group of ``group_size`` consecutive layers:

    1. Candidates: every kept prefix (its exact value; the empty prefix with
       value 0 for the first group) combined with the group configurations
       that are among the ``keep_per_bin_estimate`` best by additive
       sensitivity for their exact group cost (``k_best`` over the group's
       layers; none better can be lost, since a fixed prefix and group cost
       fix the size bin). Estimate = exact prefix value + additive group
       sensitivities.
    2. Per size bin keep the ``keep_per_bin_estimate`` best feasible
       candidates by estimate (C++ ``pareto_top_pairs``).
    3. Call ``evaluate(prefixes)`` ONCE with all of them batched:
       ``prefixes`` is an int64 array ``[N, e]`` (option index of layers
       ``0..e-1``); it must return ``N`` exact joint sensitivities of those
       configurations, with the layers not yet decided left unquantized.
       With ``pass_decided=True`` it is called ``evaluate(prefixes,
       decided=start)``: the first ``start`` columns are the kept prefixes of
       the earlier groups (few distinct rows), so an evaluator can compute
       what those layers alone determine once per distinct prefix
       (:class:`pyzeroq.sensitivity.JointEvaluator` does).
    4. Per size bin keep the ``keep_per_bin_exact`` best by exact value.

    After the last group the best exactly evaluated full configuration wins.
    Ties everywhere: value, then size/cost, then lexicographic choice vector.
    ``bins`` only matters when a group's exact costs are too large for the
    exact k-best table and its configurations too many to enumerate; it then
    coarsens the candidate pre-selection (sizes and feasibility stay exact).
    """
    s, c = _validate(sensitivity, cost)
    budget = _check_budget(budget)
    group_size = _positive_int(group_size, "group_size")
    k_est = _positive_int(keep_per_bin_estimate, "keep_per_bin_estimate")
    size_bins = _positive_int(size_bins, "size_bins")
    k_exact = _positive_int(keep_per_bin_exact, "keep_per_bin_exact")
    bins = _check_bins(bins)
    if not callable(evaluate):
        raise TypeError("evaluate must be callable: evaluate(prefix_choices[N, e]) -> values[N]")
    if not isinstance(pass_decided, bool):
        raise TypeError(f"pass_decided must be a bool, got {type(pass_decided).__name__}")
    _check_feasible(c, budget)

    layers = s.shape[0]
    mins = c.min(axis=1)
    lo = math.fsum(mins)
    top = min(budget, math.fsum(c.max(axis=1)))
    width = (top - lo) / size_bins
    edges = lo + width * np.arange(size_bins + 1, dtype=np.float64)

    pre_choices = np.zeros((1, 0), dtype=np.int64)
    pre_value = np.zeros(1)
    pre_cost = np.zeros(1)
    pre_bin = np.zeros(1, dtype=np.int64)
    groups, evaluations = [], []
    for start in range(0, layers, group_size):
        end = min(layers, start + group_size)
        x_choices, x_value, x_cost = _group_candidates(s[start:end], c[start:end], k_est, bins)
        rest = math.fsum(mins[end:])
        bin_, pi, xi, _est, size = _core.pareto_top_pairs(
            pre_value, pre_cost + rest, x_value, x_cost, lo, width, size_bins, budget, k_est)
        if bin_.size == 0:  # only possible through float rounding right at the budget
            raise ValueError(f"budget {budget!r}: no configuration of layers 0..{end - 1} fits "
                             "(costs sum to the budget within float rounding)")
        cand = np.concatenate([pre_choices[pi], x_choices[xi]], axis=1)
        exact = _call_evaluate(evaluate, cand, **({"decided": start} if pass_decided else {}))
        order = _lex_order(cand, bin_, exact, size)
        keep = order[_rank_within(bin_[order]) < k_exact]
        keep = keep[_lex_order(cand[keep])]  # next group's prefixes in lexicographic order
        pre_choices, pre_value, pre_bin = cand[keep], exact[keep], bin_[keep]
        pre_cost = _config_cost(c[:end], pre_choices)
        groups.append((start, end))
        evaluations.append(int(cand.shape[0]))

    fits = pre_cost <= budget  # re-check with the exact (fsum) cost; only float edge cases fail
    if fits.any():
        pre_choices, pre_value, pre_cost, pre_bin = (a[fits] for a in (pre_choices, pre_value, pre_cost, pre_bin))
    best = _lex_order(pre_choices, pre_value, pre_cost)[0]
    report = _lex_order(pre_choices, pre_bin, pre_value, pre_cost)
    choice = pre_choices[best].copy()
    return GroupedSearchResult(
        choice=choice,
        total=float(pre_value[best]),
        cost=float(pre_cost[best]),
        additive=math.fsum(s[np.arange(layers), choice]),
        kept_bin=pre_bin[report],
        kept_choices=pre_choices[report],
        kept_totals=pre_value[report],
        kept_costs=pre_cost[report],
        bin_edges=edges,
        groups=tuple(groups),
        evaluations=tuple(evaluations),
    )
