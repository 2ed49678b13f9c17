"""Paper-style ZeroQ tables on the full Fashion-MNIST test set.

    python bench/zeroq_tables.py --model resnet20 --tables 1,4,5,timing
    python bench/zeroq_tables.py --model mobilenetv2 --tables 1

Writes bench/results/zeroq_<model>_<tables>.md and .json (after every row). Table I: FP,
uniform and mixed precision (MPn = weights at an average of n bits over {2, 4, 8}), with
min/max activation ranges, percentile clipping, and the MSE range search
(``act_range="mse"``). Table IV: Gaussian vs real (32 training images) vs distilled
calibration, min/max and MSE ranges. Table V: ZeroQ vs Random (20 draws) vs Inverse mixed precision. Timing: one
end-to-end W8A8 ``quantize`` call (distillation included) broken down by stage. Formats:
W8A8 / W4A8 / W4A4 with MSE and min/max activation ranges in the code formats users deploy
to (``QuantConfig(target=...)``): pyzeroq's default (uint8 activations, asymmetric weights),
"tflite" / "onnxruntime" (int8 activations, symmetric narrow-range int8 weights) and
"tensorrt" (symmetric int8 activations too).

Distilled data are computed once per model (``distill_data`` with the QuantConfig
defaults and seed 0: the same tensor ``calibration="distilled"`` would recompute for
every row) and passed to the rows as calibration data.

Mixed-precision rows that differ only in activation settings (act_bits, min/max vs
percentile vs MSE ranges) share one bit-width search: the first row's
``QuantizedModel.selection`` is passed to the others (``quantize(..., selection=)``), which
gives the model a fresh search would (same weights, calibration data and selection
settings; the size budget does not depend on activations). Their ``quantize_s`` excludes
the search; ``selection_reused`` marks them in the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import pyzeroq as zq
from pyzeroq import models
from pyzeroq.data import fashion_mnist_available, load_fashion_mnist
from pyzeroq.distill import distill_data

CANDIDATES = (2, 4, 8)
PERCENTILE = 99.99
NUM_SAMPLES = 32
INPUT_SHAPE = (1, 28, 28)
RESULTS = Path(__file__).parent / "results"

TABLE1 = [("W8A8", 8, None, 8), ("W6A6", 6, None, 6), ("W4A8", 4, None, 8), ("W4A4", 4, None, 4),
          ("MP4/A8", CANDIDATES, 4, 8), ("MP3/A8", CANDIDATES, 3, 8), ("MP4/A4", CANDIDATES, 4, 4),
          ("MP3/A4", CANDIDATES, 3, 4)]
TABLE4 = [("MP4/A8", CANDIDATES, 4, 8), ("MP3/A8", CANDIDATES, 3, 8), ("W4A4", 4, None, 4)]
TABLE5 = [("MP4/A8", 4, 8), ("MP3/A8", 3, 8)]
# QuantConfig fields (beyond weight bits, budget and calibration data) the bit-width
# selection depends on among those the rows vary; act_bits / act_range / percentile do not
# (budget_metric "size")
SELECTION_FIELDS = ("mp_method", "seed")


class Runner:
    def __init__(self, name: str, split: str, draws: int, progress: bool, distill_seed: int = 0):
        self.name, self.draws, self.progress, self.distill_seed = name, draws, progress, distill_seed
        self.model = models.load_pretrained(name)
        self.images, self.labels = load_fashion_mnist(split)
        self.split = split
        fp = zq.evaluate(self.model, self.images, self.labels)
        self.fp_top1, self.fp_pred = fp.top1, fp.predictions
        self._distilled = None
        self.distill_seconds = 0.0
        self._selections = {}  # (calibration, weight bits, avg, SELECTION_FIELDS) -> Selection
        train_x, _ = load_fashion_mnist("train")
        pick = np.random.default_rng(0).choice(len(train_x), NUM_SAMPLES, replace=False)
        self.real = torch.from_numpy(train_x[np.sort(pick)]).float().div(255).unsqueeze(1)

    @property
    def distilled(self) -> torch.Tensor:
        """Distilled once, on first use (the timing table does not need it)."""
        if self._distilled is None:
            t0 = time.perf_counter()
            self._distilled = distill_data(self.model, INPUT_SHAPE, num_samples=NUM_SAMPLES, seed=self.distill_seed,
                                           progress=self.progress).data
            self.distill_seconds = time.perf_counter() - t0
        return self._distilled

    def run(self, weight_bits, avg, act_bits, calibration="distilled", **kwargs) -> dict:
        data = {"distilled": self.distilled, "real": self.real}.get(calibration)
        cfg = zq.QuantConfig(weight_bits=weight_bits, avg_weight_bits=avg, act_bits=act_bits,
                             calibration="gaussian" if data is None else "real", calibration_data=data,
                             num_samples=NUM_SAMPLES, progress=False, **kwargs)
        key = (calibration, weight_bits, avg, *(getattr(cfg, f) for f in SELECTION_FIELDS)) \
            if cfg.mixed_precision else None
        selection = self._selections.get(key)
        t0 = time.perf_counter()
        q = zq.quantize(self.model, cfg, input_shape=INPUT_SHAPE, selection=selection)
        seconds = time.perf_counter() - t0
        if key is not None:
            self._selections[key] = q.selection
        result = zq.evaluate(q, self.images, self.labels)
        return {"top1": result.top1, "agreement_with_fp": float((result.predictions == self.fp_pred).mean()),
                "size_mb": q.report.size_bytes / 1e6, "quantize_s": seconds, "bit_widths": q.bit_widths,
                "relaxation": q.report.relaxation, "selection_reused": selection is not None}


def fmt(x: float) -> str:
    return f"{x * 100:.2f}"


RANGES = {"minmax": {}, "percentile": {"percentile": PERCENTILE}, "mse": {"act_range": "mse"}}
SOURCES = ("gaussian", "real", "distilled")
FORMATS = [("W8A8", 8, 8), ("W4A8", 4, 8), ("W4A4", 4, 4)]
TARGET_COLUMNS = {"asymmetric uint8 (default)": {}, "tflite / onnxruntime": {"target": "tflite"},
                  "tensorrt": {"target": "tensorrt"}}


def table1(r: Runner, out: dict, save) -> list[str]:
    fp_mb = sum(p.numel() for p in r.model.parameters()) * 4 / 1e6
    lines = [f"### Table I — {r.name}, Fashion-MNIST {r.split} ({len(r.labels)} images), distilled data", "",
             f"| setting | min/max top-1 (%) | percentile {PERCENTILE} top-1 (%) | MSE range top-1 (%) | size (MB) |",
             "|---|---|---|---|---|", f"| FP32 | {fmt(r.fp_top1)} | {fmt(r.fp_top1)} | {fmt(r.fp_top1)} | {fp_mb:.4f} |"]
    rows = out.setdefault("table1", {"fp32": r.fp_top1})
    for label, wb, avg, ab in TABLE1:
        res = {name: r.run(wb, avg, ab, **kw) for name, kw in RANGES.items()}
        rows[label] = res
        lines.append(f"| {label} | " + " | ".join(fmt(res[m]["top1"]) for m in RANGES) +
                     f" | {res['minmax']['size_mb']:.4f} |")
        print(lines[-1], flush=True)
        save(lines)
    return lines


def table4(r: Runner, out: dict, save) -> list[str]:
    lines = [f"### Table IV — {r.name}: calibration data (top-1 %, min/max / MSE activation ranges)", "",
             "| setting | Gaussian | real (32 train images) | distilled |", "|---|---|---|---|"]
    rows = out.setdefault("table4", {})
    for label, wb, avg, ab in TABLE4:
        res = {c: {m: r.run(wb, avg, ab, calibration=c, **RANGES[m]) for m in ("minmax", "mse")} for c in SOURCES}
        rows[label] = res
        lines.append(f"| {label} | " + " | ".join(f"{fmt(res[c]['minmax']['top1'])} / {fmt(res[c]['mse']['top1'])}"
                                                  for c in SOURCES) + " |")
        print(lines[-1], flush=True)
        save(lines)
    return lines


def table5(r: Runner, out: dict, save) -> list[str]:
    lines = [f"### Table V — {r.name}: mixed-precision choice ({r.draws} random draws)", "",
             "| setting | ZeroQ | Random best | Random worst | Random mean | Random std | Inverse |",
             "|---|---|---|---|---|---|---|"]
    rows = out.setdefault("table5", {})
    for label, avg, ab in TABLE5:
        zeroq = r.run(CANDIDATES, avg, ab)["top1"]
        inverse = r.run(CANDIDATES, avg, ab, mp_method="inverse")["top1"]
        randoms = [r.run(CANDIDATES, avg, ab, mp_method="random", seed=s)["top1"] for s in range(r.draws)]
        rows[label] = {"zeroq": zeroq, "inverse": inverse, "random": randoms}
        lines.append(f"| {label} | {fmt(zeroq)} | {fmt(max(randoms))} | {fmt(min(randoms))} | "
                     f"{fmt(statistics.mean(randoms))} | {statistics.pstdev(randoms) * 100:.2f} | {fmt(inverse)} |")
        print(lines[-1], flush=True)
        save(lines)
    return lines


def formats(r: Runner, out: dict, save) -> list[str]:
    """Accuracy per code format (min/max | MSE activation ranges), distilled data."""
    lines = [f"### Code formats — {r.name}: top-1 % with min/max / MSE activation ranges, distilled data", "",
             "| setting | " + " | ".join(TARGET_COLUMNS) + " |", "|---|" + "---|" * len(TARGET_COLUMNS)]
    rows = out.setdefault("formats", {})
    for label, wb, ab in FORMATS:
        res = {col: {m: r.run(wb, None, ab, **kw, **RANGES[m]) for m in ("minmax", "mse")}
               for col, kw in TARGET_COLUMNS.items()}
        rows[label] = res
        lines.append(f"| {label} | " + " | ".join(f"{fmt(res[c]['minmax']['top1'])} / {fmt(res[c]['mse']['top1'])}"
                                                  for c in TARGET_COLUMNS) + " |")
        print(lines[-1], flush=True)
        save(lines)
    return lines


def timing(r: Runner, out: dict, save) -> list[str]:
    cfg = zq.QuantConfig(weight_bits=8, act_bits=8, progress=False)
    t0 = time.perf_counter()
    q = zq.quantize(r.model, cfg, input_shape=INPUT_SHAPE)
    total = time.perf_counter() - t0
    out["timing"] = {"total_s": total, "stages": q.report.timings, "threads": torch.get_num_threads()}
    lines = [f"### Timing — {r.name}, W8A8 end to end, {torch.get_num_threads()} threads", "",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in q.report.timings.items()]
    lines.append(f"| **total** | **{total:.2f}** |")
    print("\n".join(lines), flush=True)
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20", choices=models.MODEL_NAMES)
    parser.add_argument("--tables", default="1,4,5,timing")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--split", default=None, choices=("test", "embedded"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--distill-seed", type=int, default=0, help="seed of the distilled data (rows' spread)")
    parser.add_argument("--rows", default=None,
                        help="only these settings, e.g. MP3/A8 (comma-separated; parallel partial runs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    split = args.split or ("test" if fashion_mnist_available() else "embedded")
    runner = Runner(args.model, split, args.draws, args.progress, args.distill_seed)
    out = {"model": args.model, "split": split, "fp32_top1": runner.fp_top1,
           "distill_seconds": runner.distill_seconds, "threads": torch.get_num_threads()}
    tables = args.tables.split(",")
    command = " ".join(["python bench/zeroq_tables.py"] + (argv if argv is not None else sys.argv[1:]))
    lines = [f"## ZeroQ on {args.model} (`{command}`)",
             "", f"FP32 top-1 {fmt(runner.fp_top1)} %; {torch.get_num_threads()} torch threads.", ""]
    if args.rows:
        keep = set(args.rows.split(","))
        for table in (TABLE1, TABLE4, TABLE5, FORMATS):
            table[:] = [row for row in table if row[0] in keep]
    tag = f"zeroq_{args.model}_" + "_".join(tables) + \
        ("_" + args.rows.replace("/", "").replace(",", "_") if args.rows else "") + \
        (f"_seed{args.distill_seed}" if args.distill_seed else "")
    RESULTS.mkdir(exist_ok=True)

    def save(partial: list[str]) -> None:
        out["distill_seconds"] = runner.distill_seconds
        (RESULTS / f"{tag}.md").write_text("\n".join(lines + partial) + "\n")
        (RESULTS / f"{tag}.json").write_text(json.dumps(out, indent=1, default=str))

    for key, fn in (("1", table1), ("4", table4), ("5", table5), ("formats", formats), ("timing", timing)):
        if key in tables:
            lines += fn(runner, out, save) + [""]
            save([])
    print(f"wrote {RESULTS / tag}.md/.json")


if __name__ == "__main__":
    main()
