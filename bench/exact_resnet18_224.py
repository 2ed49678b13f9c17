"""Integer-exact mode at ImageNet size: an ImageNet-style ResNet-18 at 224 x 224 (random weights,
BN statistics warmed; bench/resnet18_imagenet.py), W8A8, Gaussian calibration.

Checks ``zq.integer_exact(q)`` against ``zq.to_integer(q)`` on a few images: every activation
code and every logit equal (asserted), and reports the default fake-quant model's drift next to
it. Writes bench/results/exact_resnet18_224.md.

    python bench/exact_resnet18_224.py --images 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from resnet18_imagenet import IMAGE_SIZE, resnet18_warmed  # noqa: E402

import pyzeroq as zq  # noqa: E402
from pyzeroq.integer.drift import code_drift  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CALIBRATION_IMAGES = 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "exact_resnet18_224.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    zq.set_num_threads(1)
    model = resnet18_warmed()
    config = zq.QuantConfig(weight_bits=8, act_bits=8, calibration="gaussian", num_samples=CALIBRATION_IMAGES,
                            progress=False)
    q = zq.quantize(model, config, input_shape=(3, IMAGE_SIZE, IMAGE_SIZE))
    im, exact = zq.to_integer(q), zq.integer_exact(q)
    x = torch.rand(args.images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    exact_drift = code_drift(exact, im, x)
    t_exact = time.perf_counter() - t0
    default_drift = code_drift(q, im, x)
    with torch.no_grad():
        logits_exact, logits_fq = exact(x), q(x)
    logits_int = im(x)
    assert all(d.differing == 0 for d in exact_drift.layers), exact_drift.to_markdown()
    np.testing.assert_array_equal(logits_exact.numpy(), logits_int.numpy())
    rel = float((logits_fq - logits_int).abs().max() / logits_int.abs().max())
    lines = ["# Integer-exact mode, ImageNet-style ResNet-18 at 224 x 224 (W8A8)", "",
             f"`python bench/exact_resnet18_224.py --images {args.images}`; {len(exact_drift.layers)} activation "
             f"quantizers, {sum(d.codes for d in exact_drift.layers)} codes compared on {args.images} images.", "",
             "| model | codes differing from the integer model | max code distance | max logit difference / max logit |",
             "|---|---|---|---|",
             f"| `zq.integer_exact(q)` | {sum(d.differing for d in exact_drift.layers)} | {exact_drift.max_distance} | "
             "0 (equal) |",
             f"| default fake-quant `q` | {sum(d.differing for d in default_drift.layers)} | "
             f"{default_drift.max_distance} | {rel:.2e} |", "",
             f"(code comparison incl. the integer model's run: {t_exact:.1f} s)", "",
             "Default fake-quant drift per quantizer:", "", default_drift.to_markdown()]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:9]))


if __name__ == "__main__":
    main()
