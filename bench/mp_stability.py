"""How stable is the mixed-precision choice? (issue 16, item 3)

    python bench/mp_stability.py --threads 1
    python bench/mp_stability.py --models resnet20 --settings MP4/A8 --seeds 0,1,2 --eval-samples 8,32
    python bench/mp_stability.py --eval-samples 16 --eval-dtype float64 --no-thread-check --out mp_stability_float64

For each model, distillation seed and mixed-precision setting (MPn/A8: weights over {2, 4, 8}
at an average of n bits, 8-bit activations, min/max ranges), the grouped search (Appendix A)
is run with each ``mp_eval_samples`` (images of the exact re-evaluation) on the same distilled
data (``distill_data(seed=s)``, the data ``QuantConfig(seed=s)`` distills), and the chosen model
is evaluated on the full Fashion-MNIST test set. Reported per (model, setting, eval samples):
top-1 mean ± std over the seeds, min-max spread, and how many distinct configurations were
chosen. A thread check re-runs seed 0 with 2 torch threads and reports whether the same bit
widths come out.

Writes bench/results/mp_stability.md / .json after every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import pyzeroq as zq
from pyzeroq import models
from pyzeroq.data import fashion_mnist_available, load_fashion_mnist
from pyzeroq.distill import distill_data

CANDIDATES = (2, 4, 8)
NUM_SAMPLES = 32
INPUT_SHAPE = (1, 28, 28)
SETTINGS = {"MP4/A8": 4, "MP3/A8": 3}
THREAD_CHECK = 2
RESULTS = Path(__file__).parent / "results"
PERCENT = 100.0


def run(model, data, avg: int, eval_samples: int, seed: int, images, labels, eval_dtype: str = "float32") -> dict:
    cfg = zq.QuantConfig(weight_bits=CANDIDATES, avg_weight_bits=avg, act_bits=8, calibration="real",
                         calibration_data=data, num_samples=NUM_SAMPLES, mp_eval_samples=eval_samples, seed=seed,
                         mp_eval_dtype=eval_dtype, progress=False)
    t0 = time.perf_counter()
    q = zq.quantize(model, cfg, input_shape=INPUT_SHAPE)
    seconds = time.perf_counter() - t0
    return {"top1": zq.evaluate(q, images, labels).top1, "bit_widths": q.bit_widths, "quantize_s": seconds,
            "exact_kl": q.report.relaxation["exact_kl"]}


def summary_rows(out: dict) -> list[str]:
    lines = ["| model | setting | eval samples | top-1 mean ± std (%) | min - max | spread (pp) | "
             "distinct configurations | per seed |", "|---|---|---|---|---|---|---|---|"]
    for key, runs in out["runs"].items():
        model, setting, n = key.split("|")
        tops = [r["top1"] * PERCENT for r in runs.values()]
        std = statistics.pstdev(tops) if len(tops) > 1 else 0.0
        distinct = len({json.dumps(r["bit_widths"], sort_keys=True) for r in runs.values()})
        lines.append(f"| {model} | {setting} | {n} | {statistics.mean(tops):.2f} ± {std:.2f} | "
                     f"{min(tops):.2f} - {max(tops):.2f} | {max(tops) - min(tops):.2f} | {distinct} of {len(tops)} | "
                     + ", ".join(f"s{s}: {r['top1'] * PERCENT:.2f}" for s, r in runs.items()) + " |")
    return lines


def write(out: dict, command: str, stem: str = "mp_stability") -> None:
    lines = [f"## Mixed-precision stability (`{command}`)", "",
             f"Full Fashion-MNIST {out['split']} set; {out['threads']} torch thread(s); distilled data "
             f"({NUM_SAMPLES} images, seed s) for calibration, sensitivities and the grouped search; exact "
             f"re-evaluation in {out.get('eval_dtype', 'float32')}.", ""]
    lines += summary_rows(out)
    if out["thread_check"]:
        lines += ["", "Thread check (seed 0, same data, 1 vs 2 torch threads): same bit widths?", ""]
        lines += [f"- {k}: {'same' if v['same'] else 'DIFFERENT'} (top-1 {v['top1'] * PERCENT:.2f} at 2 threads)"
                  for k, v in out["thread_check"].items()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20,mobilenetv2")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eval-samples", default="8,16,32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-dtype", default="float32", choices=("float32", "float64"),
                   help="QuantConfig.mp_eval_dtype of every run")
    p.add_argument("--no-thread-check", action="store_true")
    p.add_argument("--out", default="mp_stability", help="file stem under bench/results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = "test" if fashion_mnist_available() else "embedded"
    images, labels = load_fashion_mnist(split)
    command = " ".join(["python bench/mp_stability.py"] + (argv if argv is not None else sys.argv[1:]))
    out = {"split": split, "threads": args.threads, "eval_dtype": args.eval_dtype, "runs": {}, "thread_check": {}}
    seeds = [int(s) for s in args.seeds.split(",")]
    for name in args.models.split(","):
        model = models.load_pretrained(name)
        data = {s: distill_data(model, INPUT_SHAPE, num_samples=NUM_SAMPLES, seed=s, progress=False).data
                for s in seeds}
        for setting in args.settings.split(","):
            for n in (int(v) for v in args.eval_samples.split(",")):
                runs = out["runs"].setdefault(f"{name}|{setting}|{n}", {})
                for s in seeds:
                    runs[s] = run(model, data[s], SETTINGS[setting], n, s, images, labels, args.eval_dtype)
                    print(f"{name} {setting} eval={n} seed={s}: {runs[s]['top1'] * PERCENT:.2f} "
                          f"({runs[s]['quantize_s']:.0f} s)", flush=True)
                    write(out, command, args.out)
                if not args.no_thread_check and seeds[0] == 0:
                    torch.set_num_threads(THREAD_CHECK)
                    again = run(model, data[0], SETTINGS[setting], n, 0, images, labels)
                    torch.set_num_threads(args.threads)
                    out["thread_check"][f"{name} {setting} eval={n}"] = {
                        "same": again["bit_widths"] == runs[0]["bit_widths"], "top1": again["top1"]}
                    write(out, command, args.out)
    print("\n".join(summary_rows(out)))


if __name__ == "__main__":
    main()
