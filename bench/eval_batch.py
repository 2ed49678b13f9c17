"""Evaluation time against the batch size (``pyzeroq.evaluate``'s ``batch_size``) on the
Fashion-MNIST test set: the float ResNet-20, its W4A8 fake-quantized model and the integer
model. Each (model, batch size) is timed as the main job meets it: the first evaluation in a
fresh process (a warmed process hides the allocator's page faults on large activations), in
``--repeats`` processes, rounds interleaved; median and range. Every timed evaluation must give
the predictions of batch size 1000 (asserted in each worker after it: the timed call is the first).

    python bench/eval_batch.py --repeats 3

Writes bench/results/eval_batch.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
BATCHES = (50, 100, 250, 500)
MODELS = ("float", "fake-quant W4A8", "integer W4A8")
REFERENCE_BATCH = 1000
CALIB = dict(num_samples=32, distill_iters=20)


def worker(name: str, batch: int) -> dict:
    import pyzeroq as zq
    from pyzeroq.evaluation import predict
    from pyzeroq.models import load_pretrained

    images, _ = zq.data.load_fashion_mnist("test")
    model = load_pretrained("resnet20").eval()
    if name != "float":
        model = zq.quantize(model, zq.QuantConfig(weight_bits=4, act_bits=8, **CALIB), input_shape=(1, 28, 28))
        if name.startswith("integer"):
            model = zq.to_integer(model)
    t0 = time.perf_counter()
    preds = predict(model, images, batch)
    seconds = time.perf_counter() - t0
    assert np.array_equal(preds, predict(model, images, REFERENCE_BATCH)), (name, batch)
    return {"seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    times = {(m, b): [] for m in MODELS for b in BATCHES}
    for _ in range(args.repeats):
        for m, b in times:
            out = subprocess.run([sys.executable, __file__, "--worker", m, str(b)], capture_output=True, text=True,
                                 check=True).stdout
            times[m, b].append(json.loads(out.strip().splitlines()[-1])["seconds"])
    lines = ["# Evaluation time against the batch size (10,000 Fashion-MNIST test images)", "",
             f"`python bench/eval_batch.py --repeats {args.repeats}`; seconds of the first evaluation in a fresh "
             "process, median (min-max); every batch size gives the predictions of batch size 1000", "",
             "| batch | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]
    for b in BATCHES:
        cells = [f"{np.median(times[m, b]):.2f} ({min(times[m, b]):.2f}-{max(times[m, b]):.2f})" for m in MODELS]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_batch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
