"""`pyzeroq detect-quantize`: task-specific zero-shot QAT of a detector from the command line.

    pyzeroq detect-quantize --weight-bits 4 --act-bits 8 --out detector_w4a8.pt
    pyzeroq detect-quantize --calibration distilled --qat-steps 0 --out ptq.pt   # PTQ baseline

Data-parallel (one process per CPU slot or GPU; the same result as one process with the
same global batch, see :mod:`pyzeroq.detection.distributed`; rank 0 writes the files)::

    torchrun --nproc_per_node=2 -m pyzeroq.detection.cli detect-quantize --out q.pt               # gloo
    torchrun --nproc_per_node=8 -m pyzeroq.detection.cli detect-quantize --device cuda --out q.pt  # NCCL
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from .config import CALIBRATIONS, DetectionQuantConfig, QATConfig, SynthesisConfig


def _bits_or_float(text: str):
    return None if text.lower() in ("none", "float", "fp") else int(text)


def add_parsers(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("detect-quantize", help="task-specific zero-shot QAT of an object detector",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detector", type=Path, default=None,
                   help="detector checkpoint (default: the committed FP detector)")
    p.add_argument("--out", type=Path, required=True, help="where to save the quantized detector")
    p.add_argument("--weight-bits", type=int, default=4)
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--first-layer-bits", type=_bits_or_float, default=8, help="int, or 'float'")
    p.add_argument("--head-bits", type=_bits_or_float, default=8, help="int, or 'float'")
    p.add_argument("--calibration", choices=CALIBRATIONS, default="task_specific")
    p.add_argument("--real-images", type=int, default=256,
                   help="with --calibration real: number of real train scenes")
    p.add_argument("--num-images", type=int, default=SynthesisConfig.num_images,
                   help="size of the calibration set (synthetic, distilled or Gaussian images)")
    p.add_argument("--synth-iters", type=int, default=SynthesisConfig.iters,
                   help="optimization steps of the task-specific synthesis")
    p.add_argument("--no-refine", action="store_true", help="synthesis without box refinement")
    p.add_argument("--qat-steps", type=int, default=QATConfig.steps, help="QAT steps (0: PTQ, min/max ranges)")
    p.add_argument("--w-task", type=float, default=QATConfig.w_task, help="weight of the detection loss in QAT")
    p.add_argument("--samples-png", type=Path, default=None, help="also write a grid of synthetic samples")
    p.add_argument("--eval-images", type=int, default=0, help="evaluate mAP on this many test scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
    return p


def build_config(args) -> DetectionQuantConfig:
    syn = replace(SynthesisConfig(), num_images=args.num_images, iters=args.synth_iters,
                  refine=not args.no_refine)
    qat = QATConfig(weight_bits=args.weight_bits, act_bits=args.act_bits, first_layer_bits=args.first_layer_bits,
                    head_bits=args.head_bits, steps=args.qat_steps, w_task=args.w_task)
    data = None
    if args.calibration == "real":
        from .scenes import make_scenes
        data = make_scenes("train", args.real_images, seed=args.seed + 1)
    return DetectionQuantConfig(qat=qat, synthesis=syn, calibration=args.calibration, calibration_data=data,
                                distill_iters=args.synth_iters, seed=args.seed, device=args.device,
                                progress=not args.quiet)


def check_args(args) -> None:
    """What can be checked before any work: output paths, counts, the device."""
    from .._checks import check_device, output_path

    output_path(args.out, "--out", create_parents=True)
    if args.samples_png is not None:
        output_path(args.samples_png, "--samples-png", create_parents=True)
    from ..data import fashion_mnist_available
    from .scenes import MAX_SCENES

    if not 0 <= args.eval_images <= MAX_SCENES:
        raise ValueError(f"--eval-images must be in [0, {MAX_SCENES}], got {args.eval_images}")
    if args.calibration == "real" and not 1 <= args.real_images <= MAX_SCENES:
        raise ValueError(f"--real-images must be in [1, {MAX_SCENES}], got {args.real_images}")
    if (args.eval_images or args.calibration == "real") and not fashion_mnist_available():
        raise ValueError("--eval-images / --calibration real build scenes from Fashion-MNIST, which is not "
                         "installed (apt-get install -y dataset-fashion-mnist)")
    check_device(args.device, "--device")


def run(args) -> int:
    from . import distributed as ddp
    from .api import calibration_set, load_detector, load_pretrained_detector, quantize_detector
    from .metrics import evaluate_detector
    from .scenes import make_scenes
    from .synthesis import plot_samples

    check_args(args)
    args.device = ddp.init_from_env(args.device)   # under torchrun: process group, cuda:<LOCAL_RANK>
    cfg = build_config(args)
    fp = load_detector(args.detector, device=args.device) if args.detector else load_pretrained_detector(
        device=args.device)
    t0 = time.time()
    calib = calibration_set(fp, cfg)
    calib_seconds = round(time.time() - t0, 1)  # made here, so quantize_detector's own timing has 0 for it
    if args.samples_png and ddp.is_main():
        plot_samples(calib[0], calib[1], args.samples_png, title=f"calibration: {cfg.calibration}")
    q = quantize_detector(fp, cfg, calibration=calib)
    if not ddp.is_main():
        return 0
    q.save(args.out)
    report = {"out": str(args.out), "seconds": {**q.quant_info["seconds"], "calibration_set": calib_seconds}}
    if args.eval_images:
        images, coco = make_scenes("test", args.eval_images, seed=0)
        report["fp"] = evaluate_detector(fp, images, coco)
        report["quantized"] = evaluate_detector(q, images, coco)
    print(json.dumps(report, indent=2))
    return 0


def main(argv=None) -> int:
    """``python -m pyzeroq.detection.cli detect-quantize ...``: bad arguments print
    ``pyzeroq: error: <message>`` and return 2 (no traceback), as ``pyzeroq`` does."""
    from .._checks import USER_ERRORS

    parser = argparse.ArgumentParser(prog="pyzeroq")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"pyzeroq: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
