"""Quick check of the GENIE generator against ZeroQ distillation: W4A4 top-1 on the Fashion-MNIST
test set of a model calibrated on each source's images, and each distillation's wall time.

    python bench/genie_check.py --model resnet20 --samples 64 --threads 1

Calibration: ``QuantConfig(weight_bits=4, act_bits=4, act_range="mse")`` on the synthetic images
(passed as ``calibration="real"`` data); distillation with each function's defaults (500 iterations
per batch of 32) and ``--seed``. Prints one line per source and a JSON summary; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import pyzeroq as zq
from pyzeroq import models
from pyzeroq.data import load_fashion_mnist
from pyzeroq.distill import distill_data
from pyzeroq.distill_genie import distill_genie

INPUT_SHAPE = (1, 28, 28)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20", choices=("resnet20", "mobilenetv2"))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default="zeroq,genie")
    p.add_argument("--genie-lr", type=float, default=None, help="latent lr (default: distill_genie's)")
    p.add_argument("--genie-generator-lr", type=float, default=None)
    p.add_argument("--genie-widths", default=None, help="generator channels, e.g. 64,32")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = models.load_pretrained(args.model)
    images, labels = load_fashion_mnist("test")
    out = {"fp_top1": float(zq.evaluate(model, images, labels).top1)}
    widths = None if args.genie_widths is None else tuple(int(c) for c in args.genie_widths.split(","))
    genie_kw = {k: v for k, v in (("lr", args.genie_lr), ("generator_lr", args.genie_generator_lr), ("widths", widths))
                if v is not None}
    for method in args.methods.split(","):
        fn, kw = (distill_data, {}) if method == "zeroq" else (distill_genie, genie_kw)
        t0 = time.perf_counter()
        res = fn(model, INPUT_SHAPE, num_samples=args.samples, iters=args.iters, seed=args.seed, progress=False, **kw)
        seconds = time.perf_counter() - t0
        cfg = zq.QuantConfig(weight_bits=4, act_bits=4, act_range="mse", calibration="real",
                             calibration_data=res.data, num_samples=len(res.data), progress=False)
        q = zq.quantize(model, cfg, input_shape=INPUT_SHAPE)
        top1 = float(zq.evaluate(q, images, labels).top1)
        out[method] = {"top1": top1, "distill_s": seconds, "initial_loss": res.initial_loss,
                       "final_loss": res.final_loss}
        print(f"{method}: W4A4 top-1 {top1 * 100:.2f} %, distillation {seconds:.1f} s, "
              f"loss {res.initial_loss:.3f} -> {res.final_loss:.3f}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
