"""The whole ZeroQ pipeline at ImageNet size (issue 14, item 5).

    python bench/scale_resnet18.py --threads 1                       # W8A8 and MP4/A8, 500 iterations
    python bench/scale_resnet18.py --configs W8A8 --distill-iters 50 # a shorter run, projected to 500

An ImageNet-style ResNet-18 at 224x224 (bench/resnet18_imagenet.py: random init, BN statistics
warmed) is quantized end to end with the QuantConfig defaults (32 distilled images, 500
iterations unless ``--distill-iters`` says otherwise). Reported per config: each pipeline stage
(``report.timings``), the total, the peak resident memory of the process (``ru_maxrss``), and,
for a shortened distillation, the total projected to the default 500 iterations (distillation
time scales linearly with iterations). ResNet-50 is projected from ResNet-18 by the ratio of
their multiply-accumulates (4.1 vs 1.8 GMAC at 224) for distillation and sensitivity, and of
that ratio times their layer-count ratio (54 vs 21 quantized layers) for the grouped search.
Accuracy is not measured (random weights): only time and memory.

Writes bench/results/scale_resnet18.md / .json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

import pyzeroq as zq

sys.path.insert(0, str(Path(__file__).parent))
from resnet18_imagenet import IMAGE_SIZE, resnet18_warmed  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DEFAULT_ITERS = 500
CONFIGS = {"W8A8": dict(weight_bits=8, act_bits=8),
           "MP4/A8": dict(weight_bits=(2, 4, 8), avg_weight_bits=4, act_bits=8)}
TARGET_MIN = {"W8A8": 30, "MP4/A8": 60}  # issue 14: minutes at one thread
PEAK_TARGET_GB = 4.0
RESNET50_MAC_RATIO = 4.1 / 1.8
RESNET50_LAYER_RATIO = 54 / 21
KIB_PER_GB = 1024 ** 2
SECONDS_PER_MIN = 60.0


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_GB  # Linux: KiB


def run(label: str, iters: int, device: str) -> dict:
    model = resnet18_warmed()
    cfg = zq.QuantConfig(**CONFIGS[label], distill_iters=iters, device=device, progress=True)
    t0 = time.perf_counter()
    q = zq.quantize(model, cfg, input_shape=(3, IMAGE_SIZE, IMAGE_SIZE))
    total = time.perf_counter() - t0
    timings = dict(q.report.timings)
    distill = sum(v for k, v in timings.items() if k.startswith("calibration_data"))
    projected = total + distill * (DEFAULT_ITERS / iters - 1) if iters else total
    search = timings.get("pareto", 0.0)  # the Pareto DP and the grouped search
    r50 = (projected - search) * RESNET50_MAC_RATIO + search * RESNET50_MAC_RATIO * RESNET50_LAYER_RATIO
    return {"iters": iters, "timings": timings, "total_s": total, "projected_500_s": projected,
            "peak_gb": peak_gb(), "resnet50_projected_s": r50, "bit_widths": q.bit_widths}


def write(out: dict, command: str) -> None:
    lines = [f"## ZeroQ at ImageNet size: ResNet-18 @ 224 (`{command}`)", "",
             f"{out['threads']} torch thread(s), device {out['device']}; random weights (time and memory only).", "",
             "| config | distill iters | stages (s) | total (min) | projected to 500 iters (min) | target (min) | "
             "peak memory (GB) | ResNet-50 projection (min) |", "|---|---|---|---|---|---|---|---|"]
    for label, r in out["runs"].items():
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["timings"].items())
        lines.append(f"| {label} | {r['iters']} | {stages} | {r['total_s'] / SECONDS_PER_MIN:.1f} | "
                     f"{r['projected_500_s'] / SECONDS_PER_MIN:.1f} | {TARGET_MIN[label]} | {r['peak_gb']:.2f} "
                     f"(target < {PEAK_TARGET_GB:g}) | {r['resnet50_projected_s'] / SECONDS_PER_MIN:.1f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale_resnet18.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "scale_resnet18.json").write_text(json.dumps(out, indent=1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--distill-iters", type=int, default=DEFAULT_ITERS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    zq.set_num_threads(args.threads)
    command = " ".join(["python bench/scale_resnet18.py"] + (argv if argv is not None else sys.argv[1:]))
    out = {"threads": args.threads, "device": args.device, "runs": {}}
    for label in args.configs.split(","):
        out["runs"][label] = run(label, args.distill_iters, args.device)
        write(out, command)
        print(json.dumps(out["runs"][label], indent=1, default=str), flush=True)


if __name__ == "__main__":
    main()
