"""Speed of the Appendix-A grouped search: this tree against commit c868dd5, in one run.

The old code is an installed copy of c868dd5 in its own worktree and venv:

    git worktree add --detach /work/wt-old c868dd5
    cd /work/wt-old && python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 . && cd -
    .venv/bin/python bench/grouped_search_speed.py --old-python /work/wt-old/.venv/bin/python

Per model (ResNet-20, MobileNetV2) the README main job's setting MP4/A8 (weight bits
{2, 4, 8} at an average of 4, the QuantConfig defaults for the search: groups of 5, 10 /
200 / 5, the first 8 calibration images for the exact KL) on 32 distilled images (made
once with this tree's ``distill_data``, seed 0, saved to ``--cache`` and read by both
sides). Each side runs in a fresh subprocess with one thread: ``prepare``, the layer
sensitivities, then the timed stage -- what the pipeline's grouped refinement does:
``JointEvaluator`` construction, ``grouped_search``, the exact KL of the independent DP
choice. Old and new alternate (order swapped every repeat). Before any time is reported
the run asserts that both sides had identical inputs (sensitivities, costs, budget) and
made the identical selection: chosen bits, every kept configuration, evaluations per group
(compared with ``==``); the exact KLs (chosen, kept, the independent choice's) to a relative
1e-5: this tree runs the evaluation on oneDNN's NHWC conv kernels, c868dd5 on the NCHW ones.

Writes bench/results/grouped_search_speed.md and .json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CANDIDATES = (2, 4, 8)
AVG_BITS = 4  # MP4
NUM_SAMPLES = 32
EVAL_SAMPLES = 8  # the mp_eval_samples of the measurement in bench/results (QuantConfig's default was 8 then, is 16 now)
INPUT_SHAPE = (1, 28, 28)
MODELS = ("resnet20", "mobilenetv2")
RESULTS = Path(__file__).parent / "results"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cost_and_budget(params: list[int]) -> tuple[np.ndarray, int]:
    """Size cost [L, B] in gcd units and the MP4 budget (as ``pipeline.cost_matrix``)."""
    raw = np.array([[p * b for b in CANDIDATES] for p in params], dtype=np.int64)
    unit = int(np.gcd.reduce(raw.ravel()))
    return raw // unit, math.floor(sum(params) * AVG_BITS) // unit


def worker(model_name: str, data_path: str, out_path: str) -> None:
    """One side: its own installed pyzeroq (old or new), the timed grouped search, a JSON."""
    torch.set_num_threads(1)
    from pyzeroq import models, pareto
    from pyzeroq.modules import prepare, quant_layers
    from pyzeroq.sensitivity import JointEvaluator, layer_sensitivities

    data = torch.load(data_path)
    gm, info = prepare(models.load_pretrained(model_name), 8, True, None, "minmax")
    names, omega = layer_sensitivities(gm, data, CANDIDATES)
    assert names == list(info.layers)
    layers = quant_layers(gm)
    cost, budget = cost_and_budget([int(layers[n].weight.numel()) for n in names])
    independent, _ = pareto.solve(omega, cost, budget)
    new = "pass_decided" in inspect.signature(pareto.grouped_search).parameters
    t0 = time.perf_counter()
    evaluator = JointEvaluator(gm, names, CANDIDATES, data[:EVAL_SAMPLES])
    result = pareto.grouped_search(omega, cost, budget, evaluator, **({"pass_decided": True} if new else {}))
    independent_kl = float(evaluator(np.asarray(independent)[None, :])[0])
    seconds = time.perf_counter() - t0
    Path(out_path).write_text(json.dumps({
        "new": new, "seconds": seconds, "sensitivity": omega.tolist(), "cost": cost.tolist(), "budget": budget,
        "choice": result.choice.tolist(), "total": result.total, "kept_choices": result.kept_choices.tolist(),
        "kept_totals": result.kept_totals.tolist(), "evaluations": list(result.evaluations),
        "independent_kl": independent_kl, "configurations": evaluator.configurations}))


def distilled(model_name: str, cache: Path) -> Path:
    from pyzeroq import models
    from pyzeroq.distill import distill_data

    path = cache / f"distilled_{model_name}_{NUM_SAMPLES}_seed0.pt"
    if not path.exists():
        data = distill_data(models.load_pretrained(model_name), INPUT_SHAPE, num_samples=NUM_SAMPLES, seed=0,
                            progress=False).data
        torch.save(data, path)
    return path


def run_side(python: str, model_name: str, data: Path, tmp: Path) -> dict:
    out = tmp / "side.json"
    env = dict(os.environ, **{v: "1" for v in THREAD_VARS})
    env.pop("PYTHONPATH", None)
    subprocess.run([python, str(Path(__file__).resolve()), "--worker", model_name, str(data), str(out)],
                   check=True, env=env, cwd=tmp)
    return json.loads(out.read_text())


SAME_KEYS = ("sensitivity", "cost", "budget", "choice", "kept_choices", "evaluations", "configurations")
# exact KLs: this tree's evaluation runs oneDNN's NHWC conv kernels (JointEvaluator's memory_format), whose
# float results differ from c868dd5's NCHW kernels in the last bits
KL_KEYS = ("total", "kept_totals", "independent_kl")
KL_RTOL = 1e-5


def check_identical(model_name: str, old: dict, new: dict) -> float:
    """Assert the same inputs and selection; returns the largest relative difference of an exact KL."""
    assert not old["new"] and new["new"], "--old-python must run c868dd5, the default python this tree"
    for key in SAME_KEYS:
        assert old[key] == new[key], f"{model_name}: {key} differs between c868dd5 and this tree"
    worst = 0.0
    for key in KL_KEYS:
        a, b = np.asarray(old[key], dtype=float), np.asarray(new[key], dtype=float)
        assert a.shape == b.shape and np.allclose(a, b, rtol=KL_RTOL, atol=0), f"{model_name}: {key} differs"
        worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(a), np.finfo(float).tiny))))
    return worst


def summary(times: dict) -> dict:
    out = {}
    for model_name, t in times.items():
        ratios = [o / n for o, n in zip(t["old"], t["new"])]
        out[model_name] = {side: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "all_s": v}
                           for side, v in t.items()}
        out[model_name]["speedup"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                      "all": ratios}
    return out


def write(results: dict, args) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grouped_search_speed.json").write_text(json.dumps(results, indent=1))
    lines = ["### Grouped search (Appendix A), MP4/A8: c868dd5 vs this tree", "",
             f"`{' '.join(sys.argv)}`; one thread each, {args.repeats} repeats interleaved (order swapped every "
             "repeat); the timed stage is JointEvaluator construction + grouped_search + the exact KL of the "
             "independent choice. Selections asserted identical (chosen bits, every kept configuration); exact KLs "
             f"equal to rtol {KL_RTOL:g} (NHWC vs NCHW conv kernels). "
             f"Load average (1 min) at start / end: {results['load'][0]:.1f} / {results['load'][1]:.1f} "
             f"on {os.cpu_count()} cores.", "",
             "| model | evaluations | c868dd5 median (min-max) s | new median (min-max) s | speedup median (min-max) |",
             "|---|---|---|---|---|"]
    for model_name, s in results["summary"].items():
        o, n, r = s["old"], s["new"], s["speedup"]
        lines.append(f"| {model_name} | {results['selections'][model_name]['configurations']} | "
                     f"{o['median_s']:.1f} ({o['min_s']:.1f}-{o['max_s']:.1f}) | "
                     f"{n['median_s']:.1f} ({n['min_s']:.1f}-{n['max_s']:.1f}) | "
                     f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) |")
    lines += ["", "Selections (identical on both sides): " + "; ".join(
        f"{m}: exact KL {sel['total']:.6g} (independent DP choice {sel['independent_kl']:.6g}), "
        f"evaluations per group {sel['evaluations']}, largest relative KL difference {sel['kl_rel_diff']:.1e}"
        for m, sel in results["selections"].items()) + ".", "",
        "Old side: c868dd5 installed in its own worktree and venv (see the script's docstring); new side: this "
        "tree. Both read the same distilled images and compute their own sensitivities (asserted equal)."]
    (RESULTS / "grouped_search_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-python", default="/work/wt-old/.venv/bin/python")
    parser.add_argument("--new-python", default=sys.executable)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "pyzeroq_bench"))
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    names = args.models.split(",")
    data = {m: distilled(m, cache) for m in names}
    load_start = os.getloadavg()[0]
    times = {m: {"old": [], "new": []} for m in names}
    selections = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for m in names:
                sides = ("old", "new") if rep % 2 == 0 else ("new", "old")
                got = {s: run_side(args.old_python if s == "old" else args.new_python, m, data[m], Path(tmp))
                       for s in sides}
                kl_rel_diff = check_identical(m, got["old"], got["new"])
                for s in sides:
                    times[m][s].append(got[s]["seconds"])
                selections[m] = {k: got["new"][k] for k in ("choice", "total", "evaluations", "configurations",
                                                            "independent_kl")}
                selections[m]["kl_rel_diff"] = max(kl_rel_diff, selections.get(m, {}).get("kl_rel_diff", 0.0))
                print(f"repeat {rep}: {m} old {got['old']['seconds']:.1f} s, new {got['new']['seconds']:.1f} s "
                      "(identical selection)", flush=True)
    write({"summary": summary(times), "selections": selections, "threads": 1,
           "load": [load_start, os.getloadavg()[0]]}, args)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
