"""Train the FP detector on Fashion-MNIST train scenes and write its checkpoint.

    nohup python -m pyzeroq.detection.train --recipe reference --threads 1 > detector.log 2>&1 &

``--recipe reference`` reproduces the committed ``detector.pt`` in one command: the two
phases it was trained in (``REFERENCE_RECIPE``: 2,000 steps of a 4,000-step cosine
schedule at lr 3e-3, seed 0; then 600 steps from that checkpoint at lr 1.5e-3, warm-up 50,
seed 1): 15.5 min on one core here, and the result equals the committed checkpoint
bit for bit (checked 2026-11-26, torch 2.13.0 CPU). Single runs: ``--steps/--lr/--seed/--init ...``.

Scenes are drawn on the fly from one seeded stream (numpy PCG64 of ``--seed``) of
the *train* split, so the detector never sees test-split items. AdamW with a linear
warm-up and cosine decay, gradient clipping. Progress: a tqdm bar (stderr) with
``mininterval`` so background logs stay small, and one JSON line per evaluation
(stdout). Seeded: the same command gives the same weights on the same machine
and torch build.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .metrics import evaluate_detector
from .model import FCOSDetector
from .scenes import generate, make_scenes, targets_from_objects

DEFAULT_CHECKPOINT = Path(__file__).parent / "detector.pt"
WARMUP_STEPS = 200
GRAD_CLIP = 10.0
EVAL_IMAGES = 500
PROGRESS_INTERVAL_S = 20.0


def save_checkpoint(model: FCOSDetector, path: Path, meta: dict) -> None:
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    torch.save({"config": model.config, "state_dict": state, "meta": meta}, path)


def train(steps: int, batch_size: int, lr: float, weight_decay: float, seed: int, out: Path,
          threads: int | None = None, eval_every: int = 1000, device: str = "cpu", stop_after: int | None = None,
          init: Path | None = None, warmup: int = WARMUP_STEPS) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.Generator(np.random.PCG64([seed, 7]))
    model = FCOSDetector().to(device)
    if init is not None:
        ckpt = torch.load(init, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + np.cos(np.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    eval_images, eval_coco = make_scenes("test", EVAL_IMAGES, seed=1)
    start = time.time()
    history = []
    last = min(steps, stop_after) if stop_after else steps
    bar = tqdm(range(last), desc="detector", mininterval=PROGRESS_INTERVAL_S)
    running = None
    for step in bar:
        model.train()
        images, objects = generate(rng, "train", batch_size)
        x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1).to(device)
        total, parts = model.loss(model(x), targets_from_objects(objects), reduce=False)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        sched.step()
        vals = {k: v.item() for k, v in parts.items()}
        running = vals if running is None else {k: 0.98 * running[k] + 0.02 * vals[k] for k in vals}
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()}, refresh=False)
        if (step + 1) % eval_every == 0 or step + 1 == last:
            m = evaluate_detector(model, eval_images, eval_coco)
            history.append({"step": step + 1, **running, **m, "elapsed_s": round(time.time() - start, 1)})
            print(json.dumps(history[-1]), flush=True)
            save_checkpoint(model, out, {"seed": seed, "steps": step + 1, "schedule_steps": steps, "batch_size":
                                         batch_size, "lr": lr, "weight_decay": weight_decay, "warmup": warmup,
                                         "init": str(init) if init else None, "eval": m})
    return {"steps": last, "schedule_steps": steps, "init": str(init) if init else None, "warmup": warmup,
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
            "num_params": sum(p.numel() for p in model.parameters()), "history": history,
            "eval_test_seed1_500": history[-1] if history else None}


# The committed detector.pt: phase 1 was stopped after its step-2000 checkpoint.
REFERENCE_RECIPE = (
    {"steps": 4000, "stop_after": 2000, "lr": 3e-3, "warmup": WARMUP_STEPS, "seed": 0, "eval_every": 1000},
    {"steps": 600, "stop_after": None, "lr": 1.5e-3, "warmup": 50, "seed": 1, "eval_every": 600},
)


def run_recipe(out: Path, batch_size: int, weight_decay: float, threads: int | None, device: str,
               recipe: tuple = REFERENCE_RECIPE) -> dict:
    """All phases of ``recipe``, each starting from the previous phase's checkpoint ``out``."""
    phases = []
    for i, phase in enumerate(recipe):
        summary = train(phase["steps"], batch_size, phase["lr"], weight_decay, phase["seed"], out, threads,
                        phase["eval_every"], device, phase["stop_after"], out if i else None, phase["warmup"])
        phases.append(summary)
    return {**phases[-1], "phases": phases, "command": "python -m pyzeroq.detection.train --recipe reference"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this many steps of the schedule")
    parser.add_argument("--init", type=Path, default=None, help="start from this checkpoint's weights")
    parser.add_argument("--warmup", type=int, default=WARMUP_STEPS)
    parser.add_argument("--recipe", choices=("reference",), default=None,
                        help="run the phases that made the committed detector.pt (other schedule flags ignored)")
    args = parser.parse_args(argv)
    if args.recipe:
        summary = run_recipe(args.out, args.batch_size, args.weight_decay, args.threads, args.device)
        args.out.with_suffix(".train.json").write_text(json.dumps(summary, indent=2))
        print(f"saved {args.out}: {summary['eval_test_seed1_500']}")
        return
    summary = train(args.steps, args.batch_size, args.lr, args.weight_decay, args.seed, args.out,
                    args.threads, args.eval_every, args.device, args.stop_after, args.init, args.warmup)
    log = args.out.with_suffix(".train.json")
    phases = json.loads(log.read_text()).get("phases", []) if (args.init and log.exists()) else []
    log.write_text(json.dumps({**summary, "phases": phases + [summary]}, indent=2))
    print(f"saved {args.out}: {summary['eval_test_seed1_500']}")


if __name__ == "__main__":
    main()
