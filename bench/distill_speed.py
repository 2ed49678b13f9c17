"""Distillation speed: time per iteration of ``distill_data`` now vs at commit c868dd5, one thread.

Run (about 5 minutes on the 2-core machine; writes bench/results/distill_speed.md / .json):
    OMP_NUM_THREADS=1 .venv/bin/python bench/distill_speed.py

Both versions run in one process, interleaved (old, new, new, old, ...), on the same model and
seed; the old module is ``git show c868dd5:pyzeroq/distill.py`` loaded as a module (read
only). Time per iteration = (T(K) - T(0)) / K with T(k) one whole ``distill_data(iters=k)``
call on one batch: the per-batch set-up (new: the layout probe) and the final no-grad forward
cancel out. Models: the bundled ResNet-20 (28x28x1, batch 32) and a random-init
ImageNet-style ResNet-18 (224x224x3, BN statistics warmed on random data, bench/resnet18_imagenet.py).
Correctness asserted before timing (``check``): the same first loss of a whole distillation, the
same BN-statistics loss and gradient at the same inputs, and in the new code's layout a gradient
as accurate (vs a float64 reference) as the old one. ``--profile`` adds torch.profiler's top
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
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5  # relative L2 distance of two float32 gradients computed in the same layout
LAYOUT_ERR_FACTOR = 2.0  # the new layout's gradient error vs float64 may be this much of the old one's
PROFILE_ROWS = 8
PROFILE_REPEATS = 5
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


def timed(module, model, shape, batch, iters) -> float:
    t0 = time.perf_counter()
    run(module, model, shape, batch, iters)
    return time.perf_counter() - t0


def loss_and_grad(module, model, x):
    """The BN-statistics loss (sum over BN layers) of ``module`` at ``x`` and its gradient."""
    x = x.detach().clone().requires_grad_(True)
    with module.BNStatistics(model) as stats:
        model(x)
        loss = stats.loss()
    loss.backward()
    return loss.item(), x.grad


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(old, new, build, model, shape, batch) -> dict:
    """Same first loss of a whole distillation; at the same NCHW inputs the same BN-statistics
    loss and gradient; in the layout the new code runs (channels_last for 4-D inputs) a gradient
    as close to a float64 reference as the old code's (float32 convolutions in another layout
    sum in another order: ~1e-3 relative on the random-init ResNet-18, for the old code too).
    Later losses are not compared: rounding differences of the first Adam step grow over the
    iterations (the random-init ResNet-18's loss jumps ~500x after the first step)."""
    a, b = run(old, model, shape, batch, 1), run(new, model, shape, batch, 1)
    rel = abs(a.initial_loss - b.initial_loss) / abs(a.initial_loss)
    assert rel <= LOSS_RTOL, (a.initial_loss, b.initial_loss)
    x = new.gaussian_inputs(model, (batch, *shape), torch.Generator().manual_seed(1))
    loss_old, grad_old = loss_and_grad(old, model, x)
    loss_new, grad_new = loss_and_grad(new, model, x)
    assert abs(loss_new - loss_old) <= LOSS_RTOL * abs(loss_old) and rel_l2(grad_new, grad_old) <= GRAD_RTOL
    reference = build().double()
    reference.load_state_dict(model.state_dict())
    reference.requires_grad_(False)
    _, grad_f64 = loss_and_grad(old, reference, x.double())
    layout = new.input_memory_format(model, x)
    _, grad_layout = loss_and_grad(new, model, x.contiguous(memory_format=layout))
    err_old, err_new = rel_l2(grad_old, grad_f64), rel_l2(grad_layout, grad_f64)
    assert err_new <= LAYOUT_ERR_FACTOR * err_old + GRAD_RTOL, (err_new, err_old)
    return {"first_loss_old": a.initial_loss, "first_loss_new": b.initial_loss, "rel_diff": rel,
            "bn_loss_rel_diff": abs(loss_new - loss_old) / abs(loss_old), "grad_rel_l2_diff": rel_l2(grad_new, grad_old),
            "layout": str(layout), "grad_err_vs_f64_old": err_old, "grad_err_vs_f64_new_layout": err_new}


def time_case(old, new, name, repeats_override=None) -> dict:
    build, shape, batch, iters, repeats = CASES[name]
    repeats = repeats_override or repeats
    model = build()
    for p in model.parameters():
        p.requires_grad_(False)
    out = {"shape": list(shape), "batch": batch, "iters_per_call": iters, "calls": repeats,
           "check": check(old, new, build, model, shape, batch)}
    per_iter = {"old": [], "new": []}
    for r in range(repeats):
        order = (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old))
        for label, module in order:
            # (T(K) - T(0)) / K: the iterations alone, without the per-batch set-up and final forward
            setup = timed(module, model, shape, batch, 0)
            per_iter[label].append((timed(module, model, shape, batch, iters) - setup) / iters * 1e3)
    ratios = [o / n for o, n in zip(per_iter["old"], per_iter["new"])]
    for label, values in per_iter.items():
        out[label] = {"median_ms": statistics.median(values), "min_ms": min(values), "max_ms": max(values),
                      "all_ms": values}
    out["speedup_of_medians"] = out["old"]["median_ms"] / out["new"]["median_ms"]
    out["speedup_pairs"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


def loss_share(new, name, repeats: int) -> dict:
    """Forward + backward of one batch with the new BN-statistics loss vs with a plain
    ``output.sum()`` loss (same layout, interleaved): what is left to gain in the loss at all."""
    build, shape, batch, _, _ = CASES[name]
    model = build().requires_grad_(False)
    x0 = new.gaussian_inputs(model, (batch, *shape), torch.Generator().manual_seed(2))
    x0 = x0.contiguous(memory_format=new.input_memory_format(model, x0))

    def step(with_bn_loss: bool):
        x = x0.clone().requires_grad_(True)
        with new.BNStatistics(model) as stats:
            out = model(x)
            (stats.loss() if with_bn_loss else out.sum()).backward()

    times = {True: [], False: []}
    for _ in range(repeats):
        for flag in (True, False):
            step(flag)
            t0 = time.perf_counter()
            step(flag)
            times[flag].append((time.perf_counter() - t0) * 1e3)
    with_loss, plain = statistics.median(times[True]), statistics.median(times[False])
    return {"with_bn_loss_ms": with_loss, "output_sum_loss_ms": plain, "bn_loss_share": 1 - plain / with_loss}


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
             "Time per iteration = (T(K) - T(0)) / K, T(k) = one `distill_data(iters=k)` call on one batch "
             "(set-up and final forward cancel); old and new interleaved in one process.", "",
             "| model | input, batch | K x calls | old ms/iter median (min-max) | new ms/iter median (min-max) "
             "| speedup (medians) | speedup per pair median (min-max) "
             "| rel. diff old-new: first loss / BN loss / gradient | gradient error vs float64: old / new (layout) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["cases"].items():
        o, n, p = r["old"], r["new"], r["speedup_pairs"]
        lines.append(f"| {name} | {'x'.join(map(str, r['shape']))}, {r['batch']} | {r['iters_per_call']} x {r['calls']} "
                     f"| {o['median_ms']:.1f} ({o['min_ms']:.1f}-{o['max_ms']:.1f}) "
                     f"| {n['median_ms']:.1f} ({n['min_ms']:.1f}-{n['max_ms']:.1f}) "
                     f"| {r['speedup_of_medians']:.2f}x | {p['median']:.2f}x ({p['min']:.2f}-{p['max']:.2f}) "
                     f"| {r['check']['rel_diff']:.0e} / {r['check']['bn_loss_rel_diff']:.0e} / "
                     f"{r['check']['grad_rel_l2_diff']:.0e} | {r['check']['grad_err_vs_f64_old']:.1e} / "
                     f"{r['check']['grad_err_vs_f64_new_layout']:.1e} ({r['check']['layout'].split('.')[-1]}) |")
    for name, tables in results.get("profiles", {}).items():
        share = results["cases"][name]["loss_share"]
        lines += ["", f"## {name}: what is left of the BN-statistics loss", "",
                  f"Forward + backward of one batch (new code, median of {PROFILE_REPEATS}): "
                  f"{share['with_bn_loss_ms']:.1f} ms with the BN-statistics loss, {share['output_sum_loss_ms']:.1f} ms "
                  f"with `output.sum()` instead: the loss now costs {100 * share['bn_loss_share']:.0f} % of an iteration.",
                  "", f"### torch.profiler, {name}: top operators by self CPU time (% of total)", "",
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
            results["cases"][name]["loss_share"] = loss_share(new_distill, name, PROFILE_REPEATS)
    command = "OMP_NUM_THREADS=1 .venv/bin/python bench/distill_speed.py " + " ".join(argv or sys.argv[1:])
    Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    Path(args.out + ".md").write_text(markdown(results, command.strip()))
    print(markdown(results, command.strip()))


if __name__ == "__main__":
    main()
