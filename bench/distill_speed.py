"""Distillation speed: time per iteration of ``distill_data`` now vs at commit c868dd5, one thread.

Run (about 5 minutes on the 2-core machine; writes bench/results/distill_speed.md / .json):
    OMP_NUM_THREADS=1 .venv/bin/python bench/distill_speed.py

Both versions run in one process, interleaved (old, new, new, old, ...), on the same model and
seed; the old module is ``git show c868dd5:pyzeroq/distill.py`` loaded as a module (read
only). Each timed call is a whole ``distill_data(iters=K)`` (one batch) divided by K, so the
per-batch set-up and the final no-grad forward are included (they favour the old code, which
has no layout probe). Models: the bundled ResNet-20 (28x28x1, batch 32) and a random-init
ImageNet-style ResNet-18 (224x224x3, BN statistics warmed on random data, bench/resnet18_imagenet.py).
Correctness asserted before timing: from the same seed both versions report the same losses
over the first iterations (float tolerance). ``--profile`` adds torch.profiler's top
operators per version.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from resnet18_imagenet import IMAGE_SIZE, resnet18_warmed

import pyzeroq.distill as new_distill
from pyzeroq.models import load_pretrained

BASE_COMMIT = "c868dd5"
OLD_PATH = "pyzeroq/distill.py"  # the module's path at BASE_COMMIT (before the src/ layout)
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CHECK_ITERS = 3
LOSS_RTOL = 1e-4  # float32 rounding differences grow a little with each Adam step
PROFILE_ROWS = 8
# name -> (builder, input shape, batch, iterations per timed call, timed calls per version)
CASES = {
    "resnet20": (lambda: load_pretrained("resnet20"), (1, 28, 28), 32, 20, 7),
    "resnet18": (resnet18_warmed, (3, IMAGE_SIZE, IMAGE_SIZE), 8, 6, 5),
}


def load_old_module():
    source = subprocess.run(["git", "show", f"{BASE_COMMIT}:{OLD_PATH}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"distill_{BASE_COMMIT}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


def run(module, model, shape, batch, iters):
    return module.distill_data(model, shape, num_samples=batch, batch_size=batch, iters=iters, seed=0,
                               progress=False)


def check(old, new, model, shape, batch) -> dict:
    """Same seed: the losses of the first CHECK_ITERS iterations agree to float tolerance."""
    a, b = run(old, model, shape, batch, CHECK_ITERS), run(new, model, shape, batch, CHECK_ITERS)
    rel = max(abs(x - y) / abs(x) for x, y in zip(a.history, b.history))
    assert rel <= LOSS_RTOL, (a.history, b.history)
    return {"losses_old": a.history, "losses_new": b.history, "rel_diff": rel}


def time_case(old, new, name, repeats_override=None) -> dict:
    build, shape, batch, iters, repeats = CASES[name]
    repeats = repeats_override or repeats
    model = build()
    out = {"shape": list(shape), "batch": batch, "iters_per_call": iters, "calls": repeats,
           "check": check(old, new, model, shape, batch)}
    per_iter = {"old": [], "new": []}
    for r in range(repeats):
        order = (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old))
        for label, module in order:
            t0 = time.perf_counter()
            run(module, model, shape, batch, iters)
            per_iter[label].append((time.perf_counter() - t0) / iters * 1e3)
    ratios = [o / n for o, n in zip(per_iter["old"], per_iter["new"])]
    for label, values in per_iter.items():
        out[label] = {"median_ms": statistics.median(values), "min_ms": min(values), "max_ms": max(values),
                      "all_ms": values}
    out["speedup_of_medians"] = out["old"]["median_ms"] / out["new"]["median_ms"]
    out["speedup_pairs"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


def profile_case(old, new, name) -> dict:
    from torch.profiler import ProfilerActivity, profile

    build, shape, batch, _, _ = CASES[name]
    model = build()
    tables = {}
    for label, module in (("old", old), ("new", new)):
        run(module, model, shape, batch, 1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(module, model, shape, batch, 3)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        tables[label] = [(e.key, 100.0 * e.self_cpu_time_total / total) for e in events[:PROFILE_ROWS]]
    return tables


def markdown(results: dict, command: str) -> str:
    lines = [f"# Distillation speed: `distill_data` now vs {BASE_COMMIT}", "",
             f"Command: `{command}`", "",
             f"Machine: {os.cpu_count()} CPUs (shared, noisy), torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}). "
             "Time per iteration = one whole `distill_data(iters=K)` call / K (set-up included); old and new "
             "interleaved in one process.", "",
             "| model | input, batch | K x calls | old ms/iter median (min-max) | new ms/iter median (min-max) "
             "| speedup (medians) | speedup per pair median (min-max) | max rel. diff of the first losses |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["cases"].items():
        o, n, p = r["old"], r["new"], r["speedup_pairs"]
        lines.append(f"| {name} | {'x'.join(map(str, r['shape']))}, {r['batch']} | {r['iters_per_call']} x {r['calls']} "
                     f"| {o['median_ms']:.1f} ({o['min_ms']:.1f}-{o['max_ms']:.1f}) "
                     f"| {n['median_ms']:.1f} ({n['min_ms']:.1f}-{n['max_ms']:.1f}) "
                     f"| {r['speedup_of_medians']:.2f}x | {p['median']:.2f}x ({p['min']:.2f}-{p['max']:.2f}) "
                     f"| {r['check']['rel_diff']:.1e} |")
    for name, tables in results.get("profiles", {}).items():
        lines += ["", f"## torch.profiler, {name}: top operators by self CPU time (% of total)", "",
                  "| old | % | new | % |", "|---|---|---|---|"]
        for (ko, po), (kn, pn) in zip(tables["old"], tables["new"]):
            lines.append(f"| {ko} | {po:.1f} | {kn} | {pn:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per version (default per model)")
    parser.add_argument("--profile", action="store_true", help="add torch.profiler tables")
    parser.add_argument("--out", default=str(RESULTS / "distill_speed"), help="output path without suffix")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    old = load_old_module()
    results = {"base_commit": BASE_COMMIT, "cases": {}, "profiles": {}}
    for name in args.models:
        results["cases"][name] = time_case(old, new_distill, name, args.repeats)
        print(name, json.dumps({k: v for k, v in results["cases"][name].items() if k in ("old", "new", "speedup_pairs")}))
        if args.profile:
            results["profiles"][name] = profile_case(old, new_distill, name)
    command = "OMP_NUM_THREADS=1 .venv/bin/python bench/distill_speed.py " + " ".join(argv or sys.argv[1:])
    Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    Path(args.out + ".md").write_text(markdown(results, command.strip()))
    print(markdown(results, command.strip()))


if __name__ == "__main__":
    main()
