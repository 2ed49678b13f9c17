"""Tests of pyzeroq.pareto against brute force (itertools.product) references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyzeroq import _core, pareto

SETTINGS = settings(max_examples=60, deadline=None)


# ----------------------------------------------------------------------------- references


def all_configs(layers: int, options: int) -> np.ndarray:
    """Every choice vector, in lexicographic order (layer 0 most significant)."""
    return np.array(list(itertools.product(range(options), repeat=layers)), dtype=np.int64)


def fold_totals(s: np.ndarray, configs: np.ndarray) -> np.ndarray:
    """s[0] + (s[1] + (... + s[L-1])) -- the documented summation order."""
    out = []
    for cfg in configs:
        v = 0.0
        for layer in range(len(cfg) - 1, -1, -1):
            v = float(s[layer, cfg[layer]]) + v
        out.append(v)
    return np.array(out)


def config_costs(c: np.ndarray, configs: np.ndarray) -> np.ndarray:
    return np.array([sum(float(c[layer, b]) for layer, b in enumerate(cfg)) for cfg in configs])


def brute_solve(s, c, budget):
    configs = all_configs(*s.shape)
    tot, cost = fold_totals(s, configs), config_costs(c, configs)
    best = None
    for i in range(len(configs)):  # configs are in lexicographic order: first strict winner wins
        if cost[i] <= budget and (best is None or (tot[i], cost[i]) < (tot[best], cost[best])):
            best = i
    return configs[best], tot[best]


def brute_frontier(s, c):
    configs = all_configs(*s.shape)
    tot, cost = fold_totals(s, configs), config_costs(c, configs)
    points = []
    for value in sorted(set(cost)):
        idx = [i for i in range(len(configs)) if cost[i] == value]
        i = min(idx, key=lambda i: (tot[i], tuple(configs[i])))
        if not points or tot[i] < points[-1][1]:
            points.append((value, tot[i], configs[i]))
    return points


def brute_k_best(s, c, k):
    configs = all_configs(*s.shape)
    tot, cost = fold_totals(s, configs), config_costs(c, configs)
    rows = []
    for value in sorted(set(cost)):
        idx = sorted((i for i in range(len(configs)) if cost[i] == value),
                     key=lambda i: (tot[i], tuple(configs[i])))[:k]
        rows.append((value, [tot[i] for i in idx], [configs[i] for i in idx]))
    return rows


@st.composite
def instances(draw, max_layers=5, max_options=4, max_cost=7, dyadic=False):
    layers = draw(st.integers(1, max_layers))
    options = draw(st.integers(1, max_options))
    while options**layers > 1024:
        layers -= 1
    n = layers * options
    hi = 80 if dyadic else 4  # small integer range -> many ties
    s = np.array(draw(st.lists(st.integers(0, hi), min_size=n, max_size=n)), dtype=np.float64)
    s = (s / 8.0 if dyadic else s).reshape(layers, options)
    c = np.array(draw(st.lists(st.integers(0, max_cost), min_size=n, max_size=n)), dtype=np.float64)
    return s, c.reshape(layers, options)


# ----------------------------------------------------------------------------- solve / frontier


@SETTINGS
@given(inst=instances(), dyadic=instances(dyadic=True), frac=st.floats(-0.1, 1.1))
def test_solve_equals_brute_force(inst, dyadic, frac):
    for s, c in (inst, dyadic):
        lo, hi = c.min(axis=1).sum(), c.max(axis=1).sum()
        budget = math.floor(lo + frac * (hi - lo))
        if budget < lo:
            with pytest.raises(ValueError, match=f"smallest reachable total cost is {float(lo)!r}"):
                pareto.solve(s, c, budget)
            continue
        choice, total = pareto.solve(s, c, budget)
        ref_choice, ref_total = brute_solve(s, c, budget)
        assert choice.dtype == np.int64
        np.testing.assert_array_equal(choice, ref_choice)
        assert total == ref_total


def test_solve_random_float_sensitivities():
    rng = np.random.default_rng(1)
    for _ in range(20):
        s = rng.random((5, 3))
        c = rng.integers(0, 50, (5, 3)).astype(np.float64)
        budget = float(rng.integers(c.min(axis=1).sum(), c.max(axis=1).sum() + 1))
        choice, total = pareto.solve(s, c, budget)
        ref_choice, ref_total = brute_solve(s, c, budget)
        np.testing.assert_array_equal(choice, ref_choice)
        assert total == ref_total


def test_tie_break_lower_cost_then_lexicographic():
    s = np.zeros((2, 3))
    c = np.array([[2.0, 1.0, 1.0], [0.0, 0.0, 3.0]])
    choice, total = pareto.solve(s, c, 10)
    np.testing.assert_array_equal(choice, [1, 0])  # cost 1 beats cost 2; (1,0) < (1,1) < (2,*)
    assert total == 0.0


def test_large_costs_reduced_exactly_by_shift_and_gcd():
    params = np.array([1_000_003, 2_500_000, 777_777, 4_096, 12_345_678], dtype=np.float64)
    bits = np.array([2.0, 4.0, 8.0])
    c = params[:, None] * bits[None, :]  # huge integers, but gcd 2 after the shift
    s = np.random.default_rng(2).random((5, 3))
    budget = (params * 4).sum()
    choice, total = pareto.solve(s, c, budget)
    ref_choice, ref_total = brute_solve(s, c, budget)
    np.testing.assert_array_equal(choice, ref_choice)
    assert total == ref_total


@SETTINGS
@given(inst=instances())
def test_frontier_monotone_brute_force_and_solve(inst):
    s, c = inst
    f = pareto.frontier(s, c)
    ref = brute_frontier(s, c)
    assert len(f.cost) == len(ref)
    assert np.all(np.diff(f.cost) > 0) and np.all(np.diff(f.total) < 0)
    for i, (cost, total, choice) in enumerate(ref):
        assert f.cost[i] == cost and f.total[i] == total
        np.testing.assert_array_equal(f.choices[i], choice)
        ch, tot = pareto.solve(s, c, f.cost[i])
        np.testing.assert_array_equal(ch, f.choices[i])
        assert tot == f.total[i]


# ----------------------------------------------------------------------------- k_best


@SETTINGS
@given(inst=instances(), k=st.integers(1, 6))
def test_k_best_equals_brute_force(inst, k):
    s, c = inst
    r = pareto.k_best(s, c, k)
    ref = brute_k_best(s, c, k)
    width = min(k, s.shape[1] ** s.shape[0])
    assert r.totals.shape == (len(ref), width) and r.choices.shape == (len(ref), width, s.shape[0])
    for m, (cost, totals, configs) in enumerate(ref):
        n = len(totals)
        assert r.bin_cost[m] == cost and r.counts[m] == n
        np.testing.assert_array_equal(r.totals[m, :n], totals)
        assert np.all(np.isinf(r.totals[m, n:]))
        np.testing.assert_array_equal(r.choices[m, :n], np.array(configs).reshape(n, -1))
        assert np.all(r.choices[m, n:] == -1)
        np.testing.assert_array_equal(r.config_cost[m, :n], cost)


# ----------------------------------------------------------------------------- bins


@SETTINGS
@given(layers=st.integers(1, 6), options=st.integers(1, 4), bins=st.integers(1, 50),
       frac=st.floats(0.0, 1.2), seed=st.integers(0, 2**31))
def test_bins_never_exceed_budget(layers, options, bins, frac, seed):
    rng = np.random.default_rng(seed)
    s = rng.random((layers, options))
    c = rng.random((layers, options)) * 1000.0  # non-integer costs need bins=
    lo, hi = math.fsum(c.min(axis=1)), math.fsum(c.max(axis=1))
    budget = lo + frac * (hi - lo)
    choice, total = pareto.solve(s, c, budget, bins=bins)
    assert math.fsum(c[np.arange(layers), choice]) <= budget
    assert total >= pareto.frontier(s, c, bins=10**4).total.min() - 1e-12
    f = pareto.frontier(s, c, bins=bins)
    assert np.all(np.diff(f.cost) > 0) and np.all(np.diff(f.total) < 0)
    np.testing.assert_allclose(c[np.arange(layers), f.choices].sum(axis=1), f.cost)
    r = pareto.k_best(s, c, 3, bins=bins)
    valid = r.choices[..., 0] >= 0
    assert np.all(r.config_cost[valid] <= np.broadcast_to(r.bin_cost[:, None], valid.shape)[valid] * (1 + 1e-12))


def test_bins_with_budget_above_largest_cost_is_unconstrained():
    rng = np.random.default_rng(3)
    s, c = rng.random((8, 4)), rng.random((8, 4)) * 100
    choice, _ = pareto.solve(s, c, 1e9, bins=5)
    np.testing.assert_array_equal(choice, s.argmin(axis=1))


def test_bins_close_to_exact_on_integer_costs():
    rng = np.random.default_rng(4)
    s = rng.random((12, 4))
    c = rng.integers(1, 100, (12, 4)).astype(np.float64)
    budget = c.mean(axis=1).sum()
    _, exact = pareto.solve(s, c, budget)
    choice, approx = pareto.solve(s, c, budget, bins=20000)
    assert c[np.arange(12), choice].sum() <= budget and exact <= approx <= exact + 0.05


# ----------------------------------------------------------------------------- C++ reference vs optimized


def test_cpp_reference_equals_optimized():
    rng = np.random.default_rng(5)
    for trial in range(10):
        layers, options = int(rng.integers(1, 14)), int(rng.integers(1, 6))
        s = rng.integers(0, 6, (layers, options)).astype(np.float64) / (1 + trial % 2 * 7)
        q = rng.integers(0, 30, (layers, options))
        cap = int(rng.integers(0, 120))
        for last_only in (False, True):
            a = _core.pareto_frontier_dp(s, q, cap, last_only=last_only)
            b = _core.pareto_frontier_dp(s, q, cap, last_only=last_only, reference=True)
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
        k = int(rng.integers(1, 8))
        for x, y in zip(_core.pareto_k_best(s, q, cap, k), _core.pareto_k_best(s, q, cap, k, reference=True)):
            np.testing.assert_array_equal(x, y)
        pv, pc = rng.integers(0, 5, 30).astype(float), rng.integers(0, 9, 30).astype(float)
        cv, cc = rng.integers(0, 5, 40).astype(float), rng.integers(0, 9, 40).astype(float)
        args = (pv, pc, cv, cc, 1.0, 0.7, int(rng.integers(1, 12)), 14.0, k)
        for x, y in zip(_core.pareto_top_pairs(*args), _core.pareto_top_pairs(*args, reference=True)):
            np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- grouped_search (Appendix A)


@SETTINGS
@given(inst=instances(max_layers=5, max_options=3), group_size=st.integers(1, 5),
       size_bins=st.integers(1, 8), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_grouped_unlimited_equals_exhaustive_non_additive(inst, group_size, size_bins, frac, seed):
    s, c = inst
    layers, options = s.shape
    w = np.random.default_rng(seed).integers(0, 6, (layers, layers, options, options)).astype(np.float64)

    def joint(prefixes):  # a non-additive "exact sensitivity": pairwise interactions
        out = np.zeros(prefixes.shape[0])
        for n, cfg in enumerate(prefixes):
            v = sum(s[i, b] for i, b in enumerate(cfg))
            v += sum(w[i, j, cfg[i], cfg[j]] for i in range(len(cfg)) for j in range(i + 1, len(cfg)))
            out[n] = v
        return out

    calls = []

    def evaluate(prefixes):
        calls.append(prefixes.shape)
        return joint(prefixes)

    lo, hi = c.min(axis=1).sum(), c.max(axis=1).sum()
    budget = math.floor(lo + frac * (hi - lo))
    huge = 10**9
    r = pareto.grouped_search(s, c, budget, evaluate, group_size=group_size, keep_per_bin_estimate=huge,
                              size_bins=size_bins, keep_per_bin_exact=huge)
    configs = all_configs(layers, options)
    values, costs = joint(configs), config_costs(c, configs)
    feasible = [i for i in range(len(configs)) if costs[i] <= budget]
    best = min(feasible, key=lambda i: (values[i], costs[i], tuple(configs[i])))
    np.testing.assert_array_equal(r.choice, configs[best])
    assert r.total == values[best] and r.cost == costs[best]
    assert len(calls) == math.ceil(layers / group_size)  # one batched call per group
    assert [shape[1] for shape in calls] == [end for _, end in r.groups]
    assert r.evaluations[-1] == len(feasible)


@SETTINGS
@given(inst=instances(max_layers=5, max_options=4), group_size=st.integers(1, 5),
       frac=st.floats(0.0, 1.2), keep=st.integers(1, 3))
def test_grouped_additive_equals_solve(inst, group_size, frac, keep):
    s, c = inst
    lo, hi = c.min(axis=1).sum(), c.max(axis=1).sum()
    budget = math.floor(lo + frac * (hi - lo))

    def additive(prefixes):
        return s[np.arange(prefixes.shape[1]), prefixes].sum(axis=1)

    # one size bin per integer model size -> the Bellman argument makes keep=1 exact
    size_bins = int(min(budget, hi) - lo) + 1
    r = pareto.grouped_search(s, c, budget, additive, group_size=group_size, keep_per_bin_estimate=keep,
                              size_bins=size_bins, keep_per_bin_exact=keep)
    choice, total = pareto.solve(s, c, budget)
    np.testing.assert_array_equal(r.choice, choice)
    assert r.total == total and r.additive == total


def test_grouped_defaults_feasible_and_batched():
    rng = np.random.default_rng(6)
    layers, options = 13, 3
    s = rng.random((layers, options))
    c = np.outer(rng.integers(100, 2000, layers), [2, 4, 8]).astype(np.float64)
    budget = c[:, 1].sum()
    shapes = []

    def additive(prefixes):
        shapes.append(prefixes.shape)
        assert prefixes.dtype == np.int64
        return s[np.arange(prefixes.shape[1]), prefixes].sum(axis=1)

    r = pareto.grouped_search(s, c, budget, additive)
    _, opt = pareto.solve(s, c, budget)
    assert r.cost <= budget and r.cost == c[np.arange(layers), r.choice].sum()
    assert opt <= r.total + 1e-12 and r.total == pytest.approx(r.additive)
    assert [sh[1] for sh in shapes] == [5, 10, 13] and r.groups == ((0, 5), (5, 10), (10, 13))
    assert all(n <= 200 * 10 for n, _ in shapes)
    assert len(r.bin_edges) == 201 and np.all(r.kept_costs <= budget)
    counts = np.bincount(r.kept_bin)
    assert counts.max() <= 5


def test_grouped_non_integer_costs_use_enumeration():
    rng = np.random.default_rng(7)
    s, c = rng.random((6, 3)), rng.random((6, 3)) * 10
    budget = c.mean(axis=1).sum()

    def additive(prefixes):
        return s[np.arange(prefixes.shape[1]), prefixes].sum(axis=1)

    r = pareto.grouped_search(s, c, budget, additive, group_size=3)
    assert r.cost <= budget


# ----------------------------------------------------------------------------- errors


def test_errors():
    s, c = np.ones((3, 2)), np.array([[1.0, 2.0]] * 3)
    with pytest.raises(ValueError, match="smallest reachable total cost is 3.0"):
        pareto.solve(s, c, 2.5)
    with pytest.raises(ValueError, match="smallest reachable total cost is 3.0"):
        pareto.grouped_search(s, c, 2, lambda p: np.zeros(len(p)))
    bad = s.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="sensitivity"):
        pareto.solve(bad, c, 10)
    bad[1, 0] = np.inf
    with pytest.raises(ValueError, match="sensitivity"):
        pareto.frontier(bad, c)
    for value in (-1.0, np.nan, np.inf):
        badc = c.copy()
        badc[0, 1] = value
        with pytest.raises(ValueError, match="cost"):
            pareto.solve(s, badc, 10)
    with pytest.raises(ValueError, match="same shape"):
        pareto.solve(s, c[:2], 10)
    with pytest.raises(ValueError, match="2-D"):
        pareto.frontier(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="k must be >= 1"):
        pareto.k_best(s, c, 0)
    with pytest.raises(ValueError, match="bins must be >= 1"):
        pareto.solve(s, c, 10, bins=0)
    with pytest.raises(TypeError, match="bins"):
        pareto.solve(s, c, 10, bins=2.5)
    with pytest.raises(ValueError, match="budget"):
        pareto.solve(s, c, float("nan"))
    with pytest.raises(ValueError, match="bins="):
        pareto.solve(s, c + 0.5, 10)  # non-integer costs need bins
    with pytest.raises(ValueError, match="bins="):
        pareto.frontier(np.ones((4, 2)), np.array([[0, 2**30 + i] for i in range(4)], dtype=np.float64))
    with pytest.raises(ValueError, match="group_size"):
        pareto.grouped_search(s, c, 10, lambda p: np.zeros(len(p)), group_size=0)
    with pytest.raises(ValueError, match="evaluate must return"):
        pareto.grouped_search(s, c, 10, lambda p: np.zeros(len(p) + 1))
    with pytest.raises(ValueError, match="evaluate returned NaN"):
        pareto.grouped_search(s, c, 10, lambda p: np.full(len(p), np.nan))
    with pytest.raises(TypeError, match="callable"):
        pareto.grouped_search(s, c, 10, None)


def test_budget_in_bops_is_just_another_cost_matrix():
    rng = np.random.default_rng(8)
    macs = rng.integers(1, 50, 6)
    bops = np.outer(macs, [2 * 8, 4 * 8, 8 * 8]).astype(np.float64)  # w_bits x a_bits x MACs
    s = rng.random((6, 3))
    choice, total = pareto.solve(s, bops, bops[:, 1].sum())
    ref_choice, ref_total = brute_solve(s, bops, bops[:, 1].sum())
    np.testing.assert_array_equal(choice, ref_choice)
    assert total == ref_total
