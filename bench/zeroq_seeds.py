"""Table I mixed-precision rows as mean ± std over distillation seeds (issue "No silent wrong values").

    for m in resnet20 mobilenetv2; do for s in 0 1 2; do
      python bench/zeroq_tables.py --model $m --tables 1 --rows MP4/A8,MP3/A8,MP4/A4,MP3/A4 --threads 1 --distill-seed $s
    done; done
    python bench/zeroq_seeds.py --seeds 0,1,2

Reads the per-seed results ``zeroq_<model>_1_MP4A8_MP3A8_MP4A4_MP3A4[_seed<s>].json`` that
``zeroq_tables.py`` wrote (seed 0 has no suffix) and writes bench/results/zeroq_seeds.md: per
model and setting the top-1 (%) with min/max, percentile and MSE activation ranges as mean ±
population std over the seeds, the per-seed values, and how many distinct bit-width
configurations the seeds chose (the MPn/A4 rows reuse the MPn/A8 search).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROWS = ("MP4/A8", "MP3/A8", "MP4/A4", "MP3/A4")
RANGES = ("minmax", "percentile", "mse")
PERCENT = 100.0


def seed_file(model: str, seed: int) -> Path:
    tag = f"zeroq_{model}_1_" + "_".join(r.replace("/", "") for r in ROWS)
    return RESULTS / (tag + (f"_seed{seed}" if seed else "") + ".json")


def table(model: str, seeds: list[int]) -> list[str]:
    runs = {s: json.loads(seed_file(model, s).read_text())["table1"] for s in seeds}
    lines = [f"### {model} (seeds {', '.join(map(str, seeds))})", "",
             "| setting | min/max | percentile 99.99 | MSE ranges | distinct configurations | per seed (min/max) |",
             "|---|---|---|---|---|---|"]
    for row in ROWS:
        cells = []
        for rng in RANGES:
            tops = [runs[s][row][rng]["top1"] * PERCENT for s in seeds]
            std = statistics.pstdev(tops) if len(tops) > 1 else 0.0
            cells.append(f"{statistics.mean(tops):.2f} ± {std:.2f}")
        distinct = len({json.dumps(runs[s][row]["minmax"]["bit_widths"], sort_keys=True) for s in seeds})
        per_seed = ", ".join(f"s{s}: {runs[s][row]['minmax']['top1'] * PERCENT:.2f}" for s in seeds)
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {distinct} of {len(seeds)} | {per_seed} |")
    return lines + [""]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20,mobilenetv2")
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = ["## Table I mixed-precision rows over distillation seeds (`python bench/zeroq_seeds.py`)", "",
             "Top-1 (%) on the full Fashion-MNIST test set, mean ± population std over the seeds; "
             "default QuantConfig (mp_eval_samples=16).", ""]
    for model in args.models.split(","):
        lines += table(model, seeds)
    (RESULTS / "zeroq_seeds.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
