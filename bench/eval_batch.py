"""Evaluation time against the batch size (``pyzeroq.evaluate``'s ``batch_size``) on the
Fashion-MNIST test set: the float ResNet-20, its W4A8 fake-quantized model and the integer
model, each batch size timed ``--repeats`` times (median and range), rounds interleaved.
Every batch size must give the predictions of batch size 1000 (asserted before timing).

    OMP_NUM_THREADS=2 python bench/eval_batch.py --repeats 3

Writes bench/results/eval_batch.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import pyzeroq as zq
from pyzeroq.evaluation import predict
from pyzeroq.models import load_pretrained

RESULTS = Path(__file__).parent / "results"
BATCHES = (32, 64, 100, 128, 250, 500, 1000)
REFERENCE_BATCH = 1000
CALIB = dict(num_samples=32, distill_iters=50)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    images, _ = zq.data.load_fashion_mnist("test")
    model = load_pretrained("resnet20").eval()
    qmodel = zq.quantize(model, zq.QuantConfig(weight_bits=4, act_bits=8, **CALIB), input_shape=(1, 28, 28))
    models = {"float": model, "fake-quant W4A8": qmodel, "integer W4A8": zq.to_integer(qmodel)}
    times = {(m, b): [] for m in models for b in BATCHES}
    for name, m in models.items():
        ref = predict(m, images, REFERENCE_BATCH)
        for b in BATCHES:
            assert np.array_equal(predict(m, images, b), ref), (name, b)
    for _ in range(args.repeats):
        for (name, b), ts in times.items():
            t0 = time.perf_counter()
            predict(models[name], images, b)
            ts.append(time.perf_counter() - t0)
    lines = ["# Evaluation time against the batch size (10,000 Fashion-MNIST test images)", "",
             f"`python bench/eval_batch.py --repeats {args.repeats}`; seconds, median (min-max); "
             "every batch size gives the same predictions", "",
             "| batch | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for b in BATCHES:
        cells = [f"{np.median(times[m, b]):.2f} ({min(times[m, b]):.2f}-{max(times[m, b]):.2f})" for m in models]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_batch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
