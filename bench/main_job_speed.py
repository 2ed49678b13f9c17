"""The README's main job (ResNet-20, MP4/A8 over {2, 4, 8}, distilled data), this code against an
older build (default: commit c868dd5 installed in another venv), interleaved in one run, stage
by stage from the ``timings:`` line each CLI prints, plus the printed accuracy.

    git worktree add --detach /work/wt-old c868dd5 && python3 -m venv /work/wt-old/.venv && \\
        /work/wt-old/.venv/bin/pip install torch==2.13.0 /work/wt-old
    python bench/main_job_speed.py --old /work/wt-old/.venv/bin/pyzeroq --repeats 1

Writes bench/results/main_job_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ARGS = ["quantize", "--model", "resnet20", "--mixed", "2,4,8", "--avg-weight-bits", "4", "--act-bits", "8"]
LIKE_FOR_LIKE = ("--mp-eval-samples", "8")
TIMING = re.compile(r"(\w[\w ()]*?) ([\d.]+) s")


def run(cli: str, extra: tuple[str, ...] = ()) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([cli, *ARGS, *extra], capture_output=True, text=True, check=True).stdout
    total = time.perf_counter() - t0
    line = next(ln for ln in out.splitlines() if ln.startswith("timings:"))
    stages = {k.strip(): float(v) for k, v in TIMING.findall(line[len("timings:"):])}
    top1 = re.search(r"\| quantized \| ([\d.]+) %", out).group(1)
    return {"total_s": total, "stages": stages, "quantized_top1": top1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the older build's pyzeroq CLI")
    ap.add_argument("--new", default=str(Path(sys.executable).parent / "pyzeroq"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--like-for-like", action="store_true",
                    help=f"also run this code with {' '.join(LIKE_FOR_LIKE)} (c868dd5's default: the same work)")
    args = ap.parse_args()
    runs = []
    builds = ("old", "new") + (("new, like for like",) if args.like_for_like else ())
    for _ in range(args.repeats):
        r = {"old": run(args.old), "new": run(args.new)}
        if args.like_for_like:
            r["new, like for like"] = run(args.new, LIKE_FOR_LIKE)
        runs.append(r)
    flag = " --like-for-like" if args.like_for_like else ""
    lines = ["# Main job, this code vs an older build, interleaved", "",
             f"`python bench/main_job_speed.py --old {args.old} --repeats {args.repeats}{flag}`", "",
             "| run | build | total (s) | stages (s) | printed top-1 |", "|---|---|---|---|---|"]
    for i, r in enumerate(runs):
        for build in builds:
            st = ", ".join(f"{k} {v:.1f}" for k, v in r[build]["stages"].items())
            lines.append(f"| {i} | {build} | {r[build]['total_s']:.1f} | {st} | {r[build]['quantized_top1']} % |")
        for build in builds[1:]:
            lines.append(f"| {i} | old / {build} | {r['old']['total_s'] / r[build]['total_s']:.2f}x | | |")
    if args.like_for_like:
        lines += ["", f"like for like: this code with `{' '.join(LIKE_FOR_LIKE)}`, the number of images of the "
                  "grouped search's exact re-evaluation at c868dd5 (its default is 16 since 1e73032)."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "main_job_speed.json").write_text(json.dumps(runs, indent=2))
    (RESULTS / "main_job_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
