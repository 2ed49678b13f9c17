"""Integer-only detector: a committed QAT detector through ``to_quantized_model``, ``to_integer``
and ``export_onnx``; mAP of every form on the same test scenes and per-image time.

    PYTHONPATH=. nice -n 5 python bench/detection_integer.py                   # 1,000 scenes, w4a8 seed 0
    PYTHONPATH=. python bench/detection_integer.py --eval-images 50 --out /tmp/x  # smoke run

Rows (pycocotools mAP@[.5:.95] / mAP@.5 / mAP@.75 on ``make_scenes('test', N, seed=0)``, the
bench's evaluation, :func:`pyzeroq.detection.evaluate_detector`):

* FP detector;
* the QAT detector as saved (its own fake quantization, BN separate);
* the converted :class:`~pyzeroq.QuantizedModel` (BN folded, the QAT records; the tensors the
  QAT model keeps in float quantized at 8 bits on ``--calibration`` images: 256 real train
  scenes, no labels; Gaussian noise; or "synthetic", the QAT detector's own task-specific
  calibration set made again from its stored synthesis config and seed);
* its integer-exact fake quantization (``pyzeroq.integer_exact``);
* the integer model (``pyzeroq.to_integer``, the C++ simulator);
* onnxruntime (CPU, one thread) on ``export_onnx``'s file.

Time: forward pass only (no decode / NMS), one thread (torch and onnxruntime), per image,
median over ``--time-images`` test scenes after one warm-up call, in calls of 1 and of
TIME_BATCH images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import pyzeroq as zq
from pyzeroq.detection import (
    SynthesisConfig,
    evaluate_detector,
    gaussian_set,
    load_detector,
    load_pretrained_detector,
    make_scenes,
    synthesize,
)
from pyzeroq.detection.integer import as_detector, onnx_runner, to_quantized_model
from pyzeroq.integer.drift import code_drift
from pyzeroq.outputs import output_leaves

RESULTS = Path(__file__).parent / "results"
EVAL_SEED = 0       # as bench/detection_table.py
TIME_BATCH = 25     # the second timing: per-image time in calls of this many images
CALIB_SEED = 123    # the train scenes of detection_table's real-data row (their labels unused here)


def _calibration_images(kind: str, n: int, fp, qat) -> torch.Tensor:
    """``n`` images: real train scenes (no labels), Gaussian noise, or "synthetic": the QAT
    detector's own calibration set made again (its stored synthesis config and seed; ``n`` unused)."""
    if kind == "synthetic":
        cfg = (getattr(qat, "quant_info", None) or {}).get("config") or {}
        if cfg.get("calibration") != "task_specific":
            raise ValueError("--calibration synthetic needs a detector quantized on a task-specific synthetic set")
        seed = cfg["seed"] if cfg.get("synthesis_seed") is None else cfg["synthesis_seed"]
        return synthesize(fp, SynthesisConfig(**cfg["synthesis"]), seed, "cpu", progress=False).images
    if kind == "train":
        images, _ = make_scenes("train", n, seed=CALIB_SEED)
        return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return gaussian_set(fp, n, CALIB_SEED, "cpu").images


def _median_ms(fn, x: torch.Tensor, batch: int = 1) -> float:
    """Median per-image milliseconds of ``fn`` over ``x`` in calls of ``batch`` images."""
    fn(x[:batch])
    times = []
    for i in range(0, len(x) - batch + 1, batch):
        t0 = time.perf_counter()
        fn(x[i:i + batch])
        times.append((time.perf_counter() - t0) / batch)
    return 1000 * statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--detector", default=str(RESULTS / "detector_ours_w4a8_seed0.pt"))
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--calibration", choices=("train", "gaussian", "synthetic"), default="train")
    p.add_argument("--calibration-images", type=int, default=256)
    p.add_argument("--act-range", choices=("minmax", "mse"), default="minmax",
                   help="ranges of the tensors the QAT model keeps in float")
    p.add_argument("--time-images", type=int, default=100)
    p.add_argument("--out", default=str(RESULTS / "detection_integer"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import onnxruntime as ort

    images, coco = make_scenes("test", args.eval_images, seed=EVAL_SEED)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    fp = load_pretrained_detector()
    qat = load_detector(args.detector)
    calib = _calibration_images(args.calibration, args.calibration_images, fp, qat)
    t0 = time.perf_counter()
    qmodel = to_quantized_model(qat, calib, act_range=args.act_range)
    im = zq.to_integer(qmodel)
    exact = zq.integer_exact(qmodel)
    onnx_path = Path(args.out + ".onnx")
    zq.export_onnx(qmodel, onnx_path, x[:1])
    convert_s = time.perf_counter() - t0
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    runner = onnx_runner(sess, im.output)
    forms = {"FP detector": fp, "QAT detector (fake quant, as saved)": qat,
             "converted QuantizedModel (fake quant)": as_detector(qmodel, qat),
             "integer-exact fake quant (zq.integer_exact)": as_detector(exact, qat),
             "integer model (zq.to_integer, C++ simulator)": as_detector(im, qat),
             "onnxruntime on export_onnx's file": as_detector(runner, qat)}
    rows = []
    for name, det in forms.items():
        t0 = time.perf_counter()
        m = evaluate_detector(det, images, coco)
        rows.append({"form": name, **{k: float(v) for k, v in m.items()}, "eval_s": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    n = min(args.time_images, len(x))
    drift = code_drift(exact, im, x[:n])
    with torch.no_grad():
        timing = {f"{name}, batch {b}": _median_ms(fn, x[:n], b) for b in (1, min(TIME_BATCH, n))
                  for name, fn in (("integer model", im), ("onnxruntime", runner),
                                   ("QuantizedModel (torch fake quant)", qmodel))}
    same = all(np.array_equal(a, b) for a, b in zip(
        [v.numpy() for v in output_leaves(im(x[:n]))],
        [v.numpy() for v in output_leaves(runner(x[:n]))]))
    result = {"detector": Path(args.detector).name, "eval_images": args.eval_images,
              "calibration": f"{len(calib)} {args.calibration} images", "act_range": args.act_range, "rows": rows,
              "per_image_ms": {k: round(v, 3) for k, v in timing.items()}, "timed_images": n,
              "time_batches": [1, min(TIME_BATCH, n)],
              "integer_vs_exact_differing_codes": sum(d.differing for d in drift.layers),
              "onnxruntime_equals_integer_model": bool(same), "convert_export_s": round(convert_s, 1),
              "bias_adjustments": len(qmodel.report.bias_adjustments)}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    Path(args.out + ".md").write_text(_markdown(result))
    onnx_path.unlink()
    print(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    lines = [f"# Integer-only detector: `{r['detector']}`", "",
             f"Evaluation: {r['eval_images']} test scenes (`make_scenes('test', {r['eval_images']}, seed={EVAL_SEED})`), "
             "pycocotools (x100). Conversion: `pyzeroq.detection.integer.to_quantized_model` (tensors the QAT model "
             f"keeps in float: 8-bit {r.get('act_range', 'minmax')} ranges on {r['calibration']}).", "",
             "| form | mAP@[.5:.95] | mAP@.5 | mAP@.75 |", "|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['form']} | {100 * row['map']:.2f} | {100 * row['map50']:.2f} | "
                     f"{100 * row['map75']:.2f} |")
    t = r["per_image_ms"]
    ratios = "; ".join(f"integer model / onnxruntime at batch {b}: "
                       f"{t[f'integer model, batch {b}'] / t[f'onnxruntime, batch {b}']:.2f}" for b in r["time_batches"])
    lines += ["", f"Integer model vs integer-exact fake quant on {r['timed_images']} scenes: "
              f"{r['integer_vs_exact_differing_codes']} activation codes differ. onnxruntime output equals the "
              f"integer model's bit for bit: {r['onnxruntime_equals_integer_model']}.", "",
              f"Per-image forward time (one thread, median over {r['timed_images']} scenes, no decode/NMS): "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in t.items()) + f". {ratios}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
