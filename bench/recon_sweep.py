"""Quick reconstruction sweep (issue 17) on the first 2,000 test images: the lr / QDrop / first-last
figures quoted in README came from it.

    python bench/recon_sweep.py resnet20 3 '{"iters": 1000, "lr": 0.001}' '{"iters": 1000, "lr": 0.003}'

Each JSON spec: ReconstructionConfig fields plus "n" (distilled images, 128), "relax" / "augment"
(distillation options), "wr" (weight_range, "mse"), "fl" (first_last_bits); "iters": 0 means no
reconstruction. Activations: 4 bits, MSE ranges. Guard: 32 distilled images of seed 1, appended
to the calibration data (``calibration="real"`` takes the images after ``num_samples`` as the
guard set). Distilled sets are cached in /tmp/recon.
"""

import json
import os
import sys
import time

import torch

import pyzeroq as zq
from pyzeroq import models
from pyzeroq.config import ReconstructionConfig
from pyzeroq.data import load_fashion_mnist
from pyzeroq.distill import distill_data

CACHE = "/tmp/recon"


def main() -> None:
    torch.set_num_threads(1)
    name, wb = sys.argv[1], int(sys.argv[2])
    model = models.load_pretrained(name)
    x, y = load_fashion_mnist("test")
    xt, yt = torch.from_numpy(x[:2000]).float().div(255).unsqueeze(1), torch.from_numpy(y[:2000])

    def data(n, seed=0, relax=0.0, augment=False):
        path = f"{CACHE}/cache_{name}_{n}_{seed}_{relax}_{augment}.pt"
        if os.path.exists(path):
            return torch.load(path)
        d = distill_data(model, (1, 28, 28), num_samples=n, seed=seed, relax=relax, augment=augment,
                         progress=False).data
        os.makedirs(CACHE, exist_ok=True)
        torch.save(d, path)
        return d

    guard = data(32, seed=1)
    for spec in sys.argv[3:]:
        kw = json.loads(spec)
        d = data(kw.pop("n", 128), relax=kw.pop("relax", 0.0), augment=kw.pop("augment", False))
        wr, fl = kw.pop("wr", "mse"), kw.pop("fl", None)
        rec = ReconstructionConfig(**kw) if kw.get("iters", 1) else None
        cfg = zq.QuantConfig(weight_bits=wb, act_bits=4, act_range="mse", weight_range=wr, calibration="real",
                             calibration_data=torch.cat([d, guard]), num_samples=len(d), reconstruction=rec,
                             progress=False, first_last_bits=fl)
        t0 = time.time()
        q = zq.quantize(model, cfg, input_shape=(1, 28, 28))
        with torch.no_grad():
            acc = (q(xt).argmax(1) == yt).float().mean().item() * 100
        r = q.report.reconstruction or {}
        print(spec, round(acc, 2), round(time.time() - t0, 1), r.get("guard_kl_before"), r.get("guard_kl_after"),
              r.get("kept"), flush=True)


if __name__ == "__main__":
    main()
