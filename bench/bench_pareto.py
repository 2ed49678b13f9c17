"""Pareto DP benchmark: 60 layers x 4 bit widths x 10,000 bins.

    PYZEROQ_CORE_DIR=build/pareto/out PYTHONPATH=src python -m pytest bench/bench_pareto.py -q
    PYZEROQ_CORE_DIR=build/pareto/out PYTHONPATH=src python bench/bench_pareto.py   # one-run ratio table

Compares the C++ DP (pyzeroq._core.pareto_frontier_dp, what pareto.solve calls)
against a pure-Python DP of the same algorithm on the same integer cost grid,
after asserting both give the same choice and total. Also times k_best (k=10).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from pyzeroq import _core, pareto

LAYERS, BITS, BINS, K = 60, (2, 4, 6, 8), 10_000, 10


def problem():
    rng = np.random.default_rng(0)
    params = rng.integers(500, 600_000, LAYERS).astype(np.float64)
    bits = np.array(BITS, dtype=np.float64)
    cost = params[:, None] * bits[None, :]
    # sensitivity falls roughly 4x per extra bit, scaled per layer
    sens = rng.random(LAYERS)[:, None] * 4.0 ** (-bits[None, :]) * (1 + 0.1 * rng.random((LAYERS, len(BITS))))
    budget = float((params * 4).sum())  # "MP4": same size as uniform 4 bit
    grid = pareto._binned_grid(cost, BINS, budget)
    return sens, cost, budget, grid


def python_dp(s, q, capacity):
    """Pure-Python version of the C++ kernel: suffix DP, argmin table, backtrack."""
    layers, options = len(s), len(s[0])
    inf = float("inf")
    prev = [inf] * (capacity + 1)
    prev[0] = 0.0
    arg = [None] * layers
    for layer in range(layers - 1, -1, -1):
        cur = [inf] * (capacity + 1)
        arg_row = [0] * (capacity + 1)
        s_row, q_row = s[layer], q[layer]
        for c in range(capacity + 1):
            best, best_b = inf, 0
            for b in range(options):
                qb = q_row[b]
                if qb <= c:
                    v = s_row[b] + prev[c - qb]
                    if v < best:
                        best, best_b = v, b
            cur[c] = best
            arg_row[c] = best_b
        arg[layer] = arg_row
        prev = cur
    c_best = min(range(capacity + 1), key=lambda c: (prev[c], c))
    total, choice, c = prev[c_best], [], c_best
    for layer in range(layers):
        b = arg[layer][c]
        choice.append(b)
        c -= q[layer][b]
    return np.array(choice), total


def cpp_dp(s, grid):
    _, totals, choices = _core.pareto_frontier_dp(s, grid.q, grid.capacity, last_only=True)
    return choices[-1], float(totals[-1])


def check(s, cost, budget, grid):
    ch_py, tot_py = python_dp(s.tolist(), grid.q.tolist(), grid.capacity)
    ch_cpp, tot_cpp = cpp_dp(s, grid)
    np.testing.assert_array_equal(ch_cpp, ch_py)
    assert tot_cpp == tot_py
    ch, tot = pareto.solve(s, cost, budget, bins=BINS)
    np.testing.assert_array_equal(ch, ch_py)
    assert cost[np.arange(LAYERS), ch].sum() <= budget
    return ch_py


@pytest.fixture(scope="module")
def setup():
    s, cost, budget, grid = problem()
    check(s, cost, budget, grid)
    return s, cost, budget, grid


def test_cpp_dp(benchmark, setup):
    s, _, _, grid = setup
    benchmark(cpp_dp, s, grid)


def test_solve_end_to_end(benchmark, setup):
    s, cost, budget, _ = setup
    benchmark(pareto.solve, s, cost, budget, bins=BINS)


def test_k_best_10(benchmark, setup):
    s, _, _, grid = setup
    ref = _core.pareto_k_best(s, grid.q, grid.capacity, K, reference=True)
    got = _core.pareto_k_best(s, grid.q, grid.capacity, K)
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)
    _, totals, _ = _core.pareto_frontier_dp(s, grid.q, grid.capacity)
    assert totals.min() == np.nanmin(got[1][:, 0])  # best of k_best = optimum of the DP
    benchmark(_core.pareto_k_best, s, grid.q, grid.capacity, K)


def test_python_dp(benchmark, setup):
    s, _, _, grid = setup
    sl, ql = s.tolist(), grid.q.tolist()
    benchmark.pedantic(python_dp, args=(sl, ql, grid.capacity), rounds=2, iterations=1)


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    s, cost, budget, grid = problem()
    check(s, cost, budget, grid)
    sl, ql = s.tolist(), grid.q.tolist()
    t_py = best_of(lambda: python_dp(sl, ql, grid.capacity), 2)
    t_cpp = best_of(lambda: cpp_dp(s, grid), 50)
    t_ref = best_of(lambda: _core.pareto_frontier_dp(s, grid.q, grid.capacity, last_only=True, reference=True), 10)
    t_solve = best_of(lambda: pareto.solve(s, cost, budget, bins=BINS), 20)
    t_front = best_of(lambda: pareto.frontier(s, cost, bins=BINS), 5)
    t_kb = best_of(lambda: _core.pareto_k_best(s, grid.q, grid.capacity, K), 5)
    t_kb_ref = best_of(lambda: _core.pareto_k_best(s, grid.q, grid.capacity, K, reference=True), 2)
    print(f"{LAYERS} layers x {len(BITS)} options x {BINS} bins (best of N, one run)")
    print(f"  pure-Python DP            {t_py * 1e3:9.1f} ms")
    print(f"  C++ DP (kernel)           {t_cpp * 1e3:9.3f} ms   {t_py / t_cpp:7.0f}x Python")
    print(f"  C++ DP (plain reference)  {t_ref * 1e3:9.3f} ms")
    print(f"  pareto.solve(bins=)       {t_solve * 1e3:9.3f} ms   {t_py / t_solve:7.0f}x Python")
    print(f"  pareto.frontier(bins=)    {t_front * 1e3:9.3f} ms")
    print(f"  C++ k_best k={K}           {t_kb * 1e3:9.3f} ms   (plain reference {t_kb_ref * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
