"""Integer-only vs fake-quantized accuracy on the Fashion-MNIST test set (issue 6).

For ResNet-20 and MobileNetV2 at W8A8 and at ZeroQ's mixed precision MP4/A8
(weight bits from (2, 4, 8), size of a uniform 4-bit model, 8-bit activations), both
quantized data-free (distilled data), this runs

* the fake-quantized model (torch, float images in [0, 1]) and
* the integer-only model (``pyzeroq.to_integer``, float32_rne, int32 accumulators) on the
  raw uint8 pixels (integer only from the pixels to the final int32 accumulator),

and writes top-1 of both, the prediction agreement (target >= 99.9 %) and the number of
images whose predictions differ to bench/results/integer_accuracy.{md,json}.

    python bench/integer_accuracy.py                      # pretrained checkpoints, 10,000 images
    python bench/integer_accuracy.py --checkpoint file --limit 1000 --fast   # dry run

``--checkpoint file`` loads pyzeroq/models/<name>.pt directly (e.g. while the training that
writes it is still running); ``--fast`` uses Gaussian calibration with few samples.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import pyzeroq as zq
from pyzeroq.data import load_fashion_mnist
from pyzeroq.models import CHECKPOINT_DIR, build_model, load_pretrained

RESULTS = Path(__file__).parent / "results"
AGREEMENT_TARGET = 99.9
BATCH = 500
PERCENT = 100.0
CONFIGS = {
    "W8A8": dict(weight_bits=8, act_bits=8),
    "MP4/A8": dict(weight_bits=(2, 4, 8), avg_weight_bits=4, act_bits=8),
}


def load_model(name: str, source: str) -> torch.nn.Module:
    if source == "pretrained":
        return load_pretrained(name)
    model = build_model(name)
    model.load_state_dict(torch.load(CHECKPOINT_DIR / f"{name}.pt", map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def run(model, qmodel, int_model, images: np.ndarray, labels: np.ndarray) -> dict:
    fp_pred, fq_pred, int_pred, max_logit_diff = [], [], [], 0.0
    t_fq = t_int = 0.0
    for i in range(0, len(images), BATCH):
        pixels = images[i:i + BATCH, None]  # uint8 [B, 1, 28, 28]
        x = torch.from_numpy(pixels).float() / 255.0
        fp_pred.append(model(x).argmax(1).numpy())
        t0 = time.perf_counter()
        fq = qmodel(x)
        t_fq += time.perf_counter() - t0
        t0 = time.perf_counter()
        li = int_model(pixels)
        t_int += time.perf_counter() - t0
        if i == 0:  # the uint8 path is the float path, bit for bit
            assert np.array_equal(li, int_model(x.numpy())), "uint8 and float input paths differ"
        fq_pred.append(fq.argmax(1).numpy())
        int_pred.append(li.argmax(1))
        max_logit_diff = max(max_logit_diff, float(np.abs(li - fq.numpy()).max()))
    fp, fq, it = (np.concatenate(p) for p in (fp_pred, fq_pred, int_pred))
    return {"images": int(len(labels)),
            "fp_top1": float((fp == labels).mean() * PERCENT),
            "fake_quant_top1": float((fq == labels).mean() * PERCENT),
            "integer_top1": float((it == labels).mean() * PERCENT),
            "agreement": float((fq == it).mean() * PERCENT),
            "disagreements": int((fq != it).sum()),
            "max_abs_logit_diff": max_logit_diff,
            "seconds_fake_quant": t_fq, "seconds_integer": t_int}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--checkpoint", choices=["pretrained", "file"], default="pretrained")
    ap.add_argument("--limit", type=int, default=None, help="first N test images only")
    ap.add_argument("--fast", action="store_true", help="Gaussian calibration, 8 samples (dry runs)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default=str(RESULTS / "integer_accuracy"), help="output path without suffix")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    images, labels = load_fashion_mnist("test")
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    rows = []
    for name in args.models:
        model = load_model(name, args.checkpoint)
        for cfg_name in args.configs:
            extra = dict(calibration="gaussian", num_samples=8) if args.fast else {}
            config = zq.QuantConfig(**CONFIGS[cfg_name], progress=False, **extra)
            t0 = time.perf_counter()
            qmodel = zq.quantize(model, config, input_shape=(1, 28, 28))
            t_quant = time.perf_counter() - t0
            int_model = zq.to_integer(qmodel)
            row = {"model": name, "config": cfg_name, "calibration": config.calibration,
                   "bit_widths": sorted(set(qmodel.bit_widths.values())),
                   "seconds_quantize": t_quant, **run(model, qmodel, int_model, images, labels)}
            rep = int_model.report()
            row["int16_overflow_layers"] = len(rep.overflowing(16))
            row["max_bits_needed"] = max(r["bits_needed"] for r in rep.layers)
            rows.append(row)
            print(f"{name:12s} {cfg_name:7s} FP {row['fp_top1']:.2f}  fake-quant {row['fake_quant_top1']:.2f}  "
                  f"integer {row['integer_top1']:.2f}  agreement {row['agreement']:.3f} % "
                  f"({row['disagreements']} differ)", flush=True)

    meta = {"command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
            "checkpoint": args.checkpoint, "limit": args.limit, "fast": args.fast, "rounding": "float32_rne",
            "acc_bits": 32, "agreement_target_percent": AGREEMENT_TARGET, "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Integer-only vs fake-quant inference (Fashion-MNIST test set)", "",
             f"Command: `{meta['command']}`  ", f"Checkpoints: {args.checkpoint}; images: {rows[0]['images'] if rows else 0}; "
             "integer model: float32_rne requantization, int32 accumulators, uint8 pixel input.", "",
             "| model | config | calibration | FP top-1 | fake-quant top-1 | integer top-1 | agreement | differing | "
             "max bits needed | int16 overflow layers |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['config']} | {r['calibration']} | {r['fp_top1']:.2f} | "
                     f"{r['fake_quant_top1']:.2f} | {r['integer_top1']:.2f} | {r['agreement']:.2f} % | "
                     f"{r['disagreements']} | {r['max_bits_needed']} | {r['int16_overflow_layers']} |")
    worst = min((r["agreement"] for r in rows), default=PERCENT)
    lines += ["", f"Target: >= {AGREEMENT_TARGET} % identical predictions; worst: {worst:.2f} %."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
