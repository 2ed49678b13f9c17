"""The main job's process-level costs, each on and off in fresh processes, interleaved:

- ``allocator``: distillation of the README's ResNet-20 (500 iterations, 32 images, seed 0) with
  and without :func:`pyzeroq.allocator.keep_freed_memory` -- seconds, minor page faults and system
  time; the distilled images must be equal (asserted);
- ``evaluations``: the float and the quantized (MP4/A8, 50 distillation iterations) ResNet-20 on
  the 10,000 Fashion-MNIST test images, one after the other (what the CLI does) vs side by side
  (:func:`side_by_side`: a second Python thread, each on half of torch's threads -- tried for the
  CLI and dropped: no consistent gain on the 2-core machine); the predictions must be equal
  (asserted);
- ``dynamo``: the import of ``torch._dynamo`` after ``import torch`` (what any ``torch.optim``
  optimizer costs a fresh process; distillation no longer constructs one); "off" only.

    python bench/cli_overheads.py --repeats 3

Writes bench/results/cli_overheads.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def side_by_side(model, qmodel, images, labels):
    """``(evaluate(model), evaluate(qmodel))`` with the float model in a second Python thread and
    each on half of torch's threads (restored after)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    import pyzeroq as zq

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))
    try:
        with ThreadPoolExecutor(1) as pool:
            fp = pool.submit(zq.evaluate, model, images, labels)
            q = zq.evaluate(qmodel, images, labels)  # meanwhile
            return fp.result(), q
    finally:
        torch.set_num_threads(threads)


def worker(what: str, mode: str, out: str) -> None:
    import resource

    import numpy as np

    if what == "dynamo":
        import torch  # noqa: F401

        t0 = time.perf_counter()
        import torch._dynamo  # noqa: F401
        print(json.dumps({"s": time.perf_counter() - t0}))
        return
    import torch

    import pyzeroq as zq
    from pyzeroq import models
    from pyzeroq.allocator import keep_freed_memory

    if what == "allocator":
        if mode == "on":
            assert keep_freed_memory()
        from pyzeroq.distill import distill_data

        model = models.load_pretrained("resnet20")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        data = distill_data(model, (1, 28, 28), num_samples=32, seed=0, progress=False).data
        seconds = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
        torch.save(data, out)
        print(json.dumps({"s": seconds, "faults": after.ru_minflt - usage.ru_minflt,
                          "sys_s": after.ru_stime - usage.ru_stime}))
        return
    keep_freed_memory()  # as the command
    images, labels = zq.data.load_fashion_mnist("test")
    model = models.load_pretrained("resnet20")
    q = zq.quantize(model, zq.QuantConfig(weight_bits=(2, 4, 8), avg_weight_bits=4, act_bits=8, distill_iters=50,
                                          mp_eval_samples=4, progress=False),
                    input_shape=(1, 28, 28))
    t0 = time.perf_counter()
    if mode == "on":
        fp, qr = side_by_side(model, q, images, labels)
    else:
        fp, qr = zq.evaluate(model, images, labels), zq.evaluate(q, images, labels)
    seconds = time.perf_counter() - t0
    np.save(out, np.stack([fp.predictions, qr.predictions]))
    print(json.dumps({"s": seconds}))


def run(what: str, mode: str, out: Path) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", what, mode, str(out)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--what", default="allocator,evaluations,dynamo", help="comma-separated parts to time")
    args = ap.parse_args()
    import numpy as np
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for what in args.what.split(","):
            got = {"off": [], "on": []}
            for rep in range(args.repeats):
                order = ("off", "on") if rep % 2 == 0 else ("on", "off")
                for mode in (("off",) if what == "dynamo" else order):
                    got[mode].append(run(what, mode, Path(tmp) / f"{mode}.out"))
                if what == "allocator":
                    assert torch.equal(torch.load(Path(tmp) / "off.out"), torch.load(Path(tmp) / "on.out"))
                elif what == "evaluations":
                    assert np.array_equal(np.load(Path(tmp) / "off.out.npy"), np.load(Path(tmp) / "on.out.npy"))
            rows.append((what, got))
            print(what, json.dumps(got), flush=True)
    lines = ["# The main job's process-level costs, on and off", "", f"`{' '.join(sys.argv)}`; fresh processes, "
             "interleaved (order swapped every repeat); results asserted equal. Load average (1 min) at the end: "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", "",
             "| what | off: median (min-max) | on: median (min-max) | off / on per pair |", "|---|---|---|---|"]
    labels = {"allocator": ("distillation s, default allocator", "keep_freed_memory()"),
              "evaluations": ("two evaluations one after the other, s", "side by side"),
              "dynamo": ("`import torch._dynamo`, s", "-")}
    for what, got in rows:
        off, on = [g["s"] for g in got["off"]], [g["s"] for g in got["on"]]
        ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(off, on))
        cell = lambda v: f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"  # noqa: E731
        lines.append(f"| {labels[what][0]} / {labels[what][1]} | {cell(off)} | {cell(on) if on else '-'} | "
                     f"{ratios or '-'} |")
        if what == "allocator":
            for mode in ("off", "on"):
                lines.append(f"| minor page faults / system s, {mode} | "
                             + ", ".join(f"{g['faults']} / {g['sys_s']:.2f}" for g in got[mode]) + " | | |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cli_overheads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
