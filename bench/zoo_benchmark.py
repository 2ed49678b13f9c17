"""The model zoo (tests/zoo.py) timed end to end, one thread (issue "Any CNN a user brings").

Per model: the time of ``quantize`` (W8A8, distilled data with 30 distillation iterations),
``to_integer`` and ``export_onnx``, and the per-image time of the integer simulator against
onnxruntime running the exported file (one thread each, batch 8, median and spread of
interleaved repeats). Before timing, onnxruntime's outputs are checked equal to the integer
model's, bit for bit. Writes bench/results/zoo.{md,json}.

    python bench/zoo_benchmark.py                 # every zoo model
    python bench/zoo_benchmark.py --models resnet18 unet --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from zoo import ZOO, build  # noqa: E402

import pyzeroq as zq  # noqa: E402
from pyzeroq.export import output_names  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DISTILL_ITERS = 30
BATCH = 8
MS = 1e3


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _session(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def bench_model(name: str, repeats: int) -> dict:
    shape = ZOO[name][1]
    model = build(name)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    calibration = "distilled" if has_bn else "gaussian"  # nothing to distill from without BatchNorm
    config = zq.QuantConfig(weight_bits=8, act_bits=8, distill_iters=DISTILL_ITERS, calibration=calibration,
                            progress=False)
    q, t_quantize = _timed(lambda: zq.quantize(model, config, input_shape=shape))
    im, t_integer = _timed(lambda: zq.to_integer(q))
    x = torch.rand((BATCH, *shape), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        model, t_export = _timed(lambda: zq.export_onnx(q, Path(tmp) / "m.onnx", x[:1]))
    sess, xn = _session(model), x.numpy()
    env = im.run(xn)
    for (out_name, slot), value in zip(output_names(im.output), sess.run(None, {"input": xn})):
        np.testing.assert_array_equal(value, env[slot], err_msg=f"{name}: {out_name}")  # correct before timed
    sim, ort_t = [], []
    for _ in range(repeats):  # interleaved
        sim.append(_timed(lambda: im.run(xn))[1] / BATCH)
        ort_t.append(_timed(lambda: sess.run(None, {"input": xn}))[1] / BATCH)
    ratios = [s / o for s, o in zip(sim, ort_t)]
    return {"model": name, "input_shape": list(shape), "layers": len(q.report.layers), "calibration": calibration,
            "quantize_s": t_quantize, "to_integer_s": t_integer, "export_s": t_export,
            "simulator_ms_per_image": statistics.median(sim) * MS, "onnxruntime_ms_per_image":
            statistics.median(ort_t) * MS, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios)}


def to_markdown(rows: list, meta: dict) -> str:
    lines = [f"# Model zoo, end to end (W8A8, {DISTILL_ITERS} distillation iterations, one thread)", "",
             f"{meta['machine']}; torch {meta['torch']}; {meta['repeats']} interleaved repeats of batch {BATCH}. "
             "onnxruntime's outputs equal the integer model's bit for bit (checked before timing).", "",
             "| model | input | layers | calibration | quantize (s) | to_integer (s) | export (s) | simulator (ms/img) | "
             "onnxruntime (ms/img) | simulator / ORT (median, min-max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input_shape']))} | {r['layers']} | {r['calibration']} | "
                     f"{r['quantize_s']:.1f} | {r['to_integer_s']:.2f} | {r['export_s']:.2f} | "
                     f"{r['simulator_ms_per_image']:.2f} | {r['onnxruntime_ms_per_image']:.2f} | "
                     f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=sorted(ZOO), choices=sorted(ZOO))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(RESULTS / "zoo"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    zq.integer.set_num_threads(1)
    rows = []
    for name in args.models:
        rows.append(bench_model(name, args.repeats))
        print(f"{name}: quantize {rows[-1]['quantize_s']:.1f} s, simulator/ORT {rows[-1]['ratio_median']:.2f}",
              flush=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
            "torch": torch.__version__, "repeats": args.repeats}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    Path(args.out + ".md").write_text(to_markdown(rows, meta))
    print(to_markdown(rows, meta))


if __name__ == "__main__":
    main()
