"""Kernel threads before / after the persistent pool: fake_quantize (per channel, 8 bits) and an
integer conv, at 1 and 2 threads, against torch's fake_quantize_per_channel_affine and np.copyto.

Run (about 2 minutes; writes bench/results/threads.md / .json):
    git worktree add --detach /work/wt-base-threads 26cba67
    (cd /work/wt-base-threads && OUTDIR=build/base/out PYTHON=$PWD/../wt-threads/.venv/bin/python \\
        tools/dev_build.sh build/base)          # the base commit's extension, same Python
    .venv/bin/python bench/threads_speed.py --base-core /work/wt-base-threads/build/base/out

"after" is this checkout's extension, "base" the base commit's (loaded in the same process under
another module name, called through the same Python wrappers). The base has no thread setting
for its quantize kernels: above 65536 elements every call starts hardware_concurrency() threads
(2 here) and joins them; its integer kernels know only all threads or 1. Contenders alternate
within every round; each round times a batch of calls (>= MIN_BATCH_S) and keeps the mean per
call; the table gives the median and min-max over the rounds. Correctness asserted before
timing: after == base bit for bit, torch equal up to the documented one-code tie differences
(bench_fake_quantize.check_against_torch), integer conv == the reference loops.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from bench_fake_quantize import BITS, QMAX, check_against_torch, make_data

import pyzeroq as zq
import pyzeroq.integer as zi
from pyzeroq import ops
from pyzeroq.integer import simulate

RESULTS = Path(__file__).resolve().parent / "results"
CHANNELS = 64
SIZES = (1 << 14, 1 << 17, 1 << 20, 1 << 22)  # elements: below the split threshold .. 16 MiB
THREADS = (1, 2)
ROUNDS = 15
MIN_BATCH_S = 0.02
CONV = dict(n=1, c=16, o=16, hw=28, k=3)  # a ResNet-20 layer at batch 1: small, thread start matters


def load_base_core(directory: str):
    """The base commit's pyzeroq._core as module 'pyzeroq_base._core' (PyInit__core)."""
    path = str(next(Path(directory).glob("_core*.so")))
    loader = importlib.machinery.ExtensionFileLoader("pyzeroq_base._core", path)
    spec = importlib.util.spec_from_file_location("pyzeroq_base._core", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@contextmanager
def using_core(core):
    """Run the pyzeroq wrappers (ops, integer) on another build of the extension."""
    saved = ops._core, simulate._core
    ops._core = simulate._core = core
    try:
        yield
    finally:
        ops._core, simulate._core = saved


def per_call_s(fn) -> float:
    fn()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= MIN_BATCH_S:
            return elapsed / calls


def rounds(contenders: dict) -> dict:
    times = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(per_call_s(contenders[name]) * 1e3)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in times.items()}


def fake_quantize_contenders(size: int, base_core) -> dict:
    """Checked callables for one size: after, torch, memcpy and (when given) base."""
    x, scale, zp = make_data(shape=(CHANNELS, size // CHANNELS))
    xt, st, zt = torch.from_numpy(x), torch.from_numpy(scale), torch.from_numpy(zp)
    buf = np.empty_like(x)
    after = ops.fake_quantize(x, scale, zp, BITS, 0)
    theirs = torch.fake_quantize_per_channel_affine(xt, st, zt, 0, 0, QMAX).numpy()
    check_against_torch(after, theirs, x, scale, zp)
    contenders = {
        "after": lambda: ops.fake_quantize(x, scale, zp, BITS, 0, out=buf),
        "torch": lambda: torch.fake_quantize_per_channel_affine(xt, st, zt, 0, 0, QMAX),
        "memcpy (1 thread)": lambda: np.copyto(buf, x),
    }
    if base_core is not None:
        with using_core(base_core):
            assert np.array_equal(ops.fake_quantize(x, scale, zp, BITS, 0), after)

        def base():
            with using_core(base_core):
                ops.fake_quantize(x, scale, zp, BITS, 0, out=buf)
        contenders["base"] = base
    return contenders


def fake_quantize_cases(base_core) -> list:
    out = []
    for size in SIZES:
        contenders = fake_quantize_contenders(size, base_core)
        for threads in THREADS:
            zq.set_num_threads(threads)
            torch.set_num_threads(threads)
            # the base quantize kernel has no thread setting: timed once, in the 2-thread rows
            run = {k: v for k, v in contenders.items() if k != "base" or threads == max(THREADS)}
            out.append({"kernel": "fake_quantize per channel", "elements": size, "threads": threads, **rounds(run)})
    return out


def conv_args(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n, c, o, hw, k = (CONV[key] for key in ("n", "c", "o", "hw", "k"))
    return dict(x=rng.integers(0, 256, (n, c, hw, hw), dtype=np.uint8), x_scale=0.02, x_zero_point=np.uint8(3),
                w=rng.integers(0, 256, (o, c, k, k), dtype=np.uint8),
                w_scale=rng.uniform(0.001, 0.01, o).astype(np.float32),
                w_zero_point=rng.integers(100, 156, o).astype(np.uint8), y_scale=0.5, y_zero_point=np.uint8(128),
                bias=rng.integers(-5000, 5000, o).astype(np.int32), padding=k // 2)


def conv_cases(base_core) -> list:
    args = conv_args()
    ref, _ = zi.qlinear_conv2d(**args, impl="reference")
    assert np.array_equal(zi.qlinear_conv2d(**args)[0], ref)
    contenders = {"after": lambda: zi.qlinear_conv2d(**args)}
    if base_core is not None:
        with using_core(base_core):
            assert np.array_equal(zi.qlinear_conv2d(**args)[0], ref)

        def base():
            with using_core(base_core):
                zi.qlinear_conv2d(**args)
        contenders["base"] = base
    out = []
    for threads in THREADS:
        zq.set_num_threads(threads)
        if base_core is not None:
            base_core.integer_set_num_threads(1 if threads == 1 else 0)  # 0: all hardware threads
        shape = "x".join(str(CONV[k]) for k in ("n", "c", "hw", "hw"))
        out.append({"kernel": f"qlinear_conv2d {shape}, {CONV['o']}x{CONV['k']}x{CONV['k']}",
                    "elements": int(ref.size), "threads": threads, **rounds(contenders)})
    return out


def _cell(row: dict, key: str) -> str:
    if key not in row:
        return "-"
    r = row[key]
    return f"{r['median_ms'] * 1e3:.0f} ({r['min_ms'] * 1e3:.0f}-{r['max_ms'] * 1e3:.0f})"


def _ratio(row: dict, num: str, den: str) -> str:
    return f"{row[num]['median_ms'] / row[den]['median_ms']:.2f}x" if num in row and den in row else "-"


def markdown(results: dict, with_base: bool) -> str:
    keys = ["after", "base", "torch", "memcpy (1 thread)"]
    lines = ["# C++ kernel threads: persistent pool (after) vs a thread start per call (base 26cba67)", "",
             f"Machine: {results['cpus']} CPUs (shared, noisy), torch {results['torch']}. Times in microseconds "
             f"per call: median (min-max) over {ROUNDS} interleaved rounds. torch runs at the same thread count "
             "(torch.set_num_threads). Base quantize kernel: no thread setting (2 threads started per call above "
             "65536 elements), so it appears in the 2-thread rows only." + ("" if with_base else " (base not run)"),
             "", "| kernel | elements | threads | " + " | ".join(keys) + " | base / after | torch / after |",
             "|---|---|---|" + "---|" * (len(keys) + 2)]
    for row in results["rows"]:
        lines.append(f"| {row['kernel']} | {row['elements']} | {row['threads']} | "
                     + " | ".join(_cell(row, k) for k in keys)
                     + f" | {_ratio(row, 'base', 'after')} | {_ratio(row, 'torch', 'after')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-core", default=None, help="directory holding the base commit's _core*.so")
    parser.add_argument("--out", default=str(RESULTS / "threads"))
    args = parser.parse_args(argv)
    base_core = load_base_core(args.base_core) if args.base_core else None
    results = {"cpus": os.cpu_count(), "torch": torch.__version__, "rows": fake_quantize_cases(base_core)}
    results["rows"] += conv_cases(base_core)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    md = markdown(results, base_core is not None)
    Path(args.out + ".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
