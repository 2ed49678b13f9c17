"""Integer conv simulator speed, per SIMD path, against torch fbgemm int8 conv and
onnxruntime QLinearConv, on the conv layers of ResNet-20 and MobileNetV2 (28x28
Fashion-MNIST models, batch 32) and of an ImageNet ResNet-18 at 224x224 (batch 1).

    python bench/bench_integer_conv.py [--reps 9] [--models resnet20,mobilenetv2,resnet18_224]
    pytest bench/bench_integer_conv.py --benchmark-only          # pytest-benchmark, per layer

Every path this CPU runs (``pyzeroq._core.integer_available_impls()``: fast_avx512vnni,
fast_avxvnni, fast_avx2, fast_generic) is timed at one thread (all runtimes at one thread);
every runtime's codes are asserted equal before anything is timed. Timing is interleaved
(each repetition times every implementation on every layer in turn, so a busy machine
slows them alike; a layer's time in a repetition is the fastest of INNER_CALLS calls in a
row; pyzeroq gets one ``WeightCache`` per layer, as the integer model holds, so its packed
weights are reused the way fbgemm's prepacked and onnxruntime's session weights are); a
model's time is the sum over its conv layers (repeated layers counted), per
repetition. Reported: the median model time, its spread (min .. max over
repetitions), and the median of the per-repetition time ratios path / fbgemm and path / ort
with their spread; then the geometric mean of the median ratios over the models.
Results go to bench/results/integer_conv_paths.{md,json}.

Activations are drawn in [0, 127]: fbgemm's AVX2 kernel (vpmaddubsw) saturates int16 pair
sums for larger u8*s8 products (torch's observers use reduce_range on x86 for that reason);
weight zero points are 128 (= qint8 zero point 0, the only per-channel zero point fbgemm
accepts) so that all runtimes compute the same thing. The row "<best> zw random" times the
best path with per-channel weight zero points drawn in [0, 255] (checked against
onnxruntime only; its ratio to fbgemm compares different arithmetic).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch's OpenMP pool would spin beside the timed calls

import pyzeroq as zq
import pyzeroq.integer as zi
from pyzeroq import _core

RESULTS = Path(__file__).parent / "results"
MODELS = ("resnet20", "mobilenetv2", "resnet18_224")
BATCH = {"resnet20": 32, "mobilenetv2": 32, "resnet18_224": 1}
SX, ZX, SY, ZY = np.float32(0.02), 11, np.float32(0.3), 100
ACT_CODES = 128  # activations in [0, ACT_CODES): see the module docstring (fbgemm saturation)
CODES = 256
WEIGHT_ZP = 128
SY_DEPTHWISE = np.float32(0.05)
# (name, C_in, C_out, H=W, kernel, stride, padding, groups) -> count, per model
Layer = collections.namedtuple("Layer", "cin cout hw k stride pad groups")


def model_layers(model: str) -> "collections.Counter[Layer]":
    """The conv layers of a model (forward hooks on its nn.Conv2d), repeated ones counted."""
    import torch

    if model == "resnet18_224":
        sys.path.insert(0, str(Path(__file__).parent))
        from resnet18_imagenet import IMAGE_SIZE, ResNet18

        net, shape = ResNet18(), (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    else:
        from pyzeroq.models import mobilenetv2, resnet20

        net, shape = (resnet20() if model == "resnet20" else mobilenetv2()), (1, 1, 28, 28)
    layers: collections.Counter = collections.Counter()

    def hook(m, inputs, _out):
        x = inputs[0]
        assert x.shape[2] == x.shape[3] and m.padding[0] == m.padding[1]
        layers[Layer(x.shape[1], m.out_channels, x.shape[2], m.kernel_size[0], m.stride[0], m.padding[0],
                     m.groups)] += 1

    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net.eval()(torch.rand(shape))
    return layers


def make_problem(layer: Layer, batch: int, seed=0, random_zw=False):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, ACT_CODES, (batch, layer.cin, layer.hw, layer.hw), dtype=np.uint8)
    w = rng.integers(0, CODES, (layer.cout, layer.cin // layer.groups, layer.k, layer.k), dtype=np.uint8)
    sw = rng.uniform(0.001, 0.01, layer.cout).astype(np.float32)
    zw = rng.integers(0, CODES, layer.cout) if random_zw else np.full(layer.cout, WEIGHT_ZP, np.int64)
    # one packed-weight cache per layer, as the integer model holds (fbgemm / onnxruntime prepack too)
    return dict(x=x, w=w, sw=sw, zw=zw, stride=layer.stride, pad=layer.pad, groups=layer.groups,
                sy=SY_DEPTHWISE if layer.groups > 1 else SY, cache=zi.WeightCache())


def macs(p) -> int:
    o, cg, k, _ = p["w"].shape
    h = (p["x"].shape[2] + 2 * p["pad"] - k) // p["stride"] + 1
    return p["x"].shape[0] * o * h * h * cg * k * k


# ------------------------------------------------------------ implementations
def run_sim(p, impl):
    return zi.qlinear_conv2d(p["x"], SX, ZX, p["w"], p["sw"], p["zw"], p["sy"], ZY, None, p["stride"], p["pad"], 1,
                             p["groups"], impl=impl, weight_cache=p["cache"])[0]


def make_fbgemm(p):
    import torch
    import torch.ao.nn.quantized as nnq

    warnings.filterwarnings("ignore", category=UserWarning)
    torch.backends.quantized.engine = "fbgemm"
    o, cg, k, _ = p["w"].shape
    qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(p["x"]), float(SX), ZX)
    wi8 = torch.from_numpy((p["w"].astype(np.int16) - WEIGHT_ZP).astype(np.int8))
    qw = torch._make_per_channel_quantized_tensor(wi8, torch.from_numpy(p["sw"].astype(np.float64)),
                                                  torch.from_numpy(p["zw"] - WEIGHT_ZP), 0)
    mod = nnq.Conv2d(cg * p["groups"], o, k, stride=p["stride"], padding=p["pad"], groups=p["groups"], bias=False)
    mod.set_weight_bias(qw, None)
    mod.scale, mod.zero_point = float(p["sy"]), ZY
    return lambda: mod(qx).int_repr().numpy()


def make_ort(p, threads=1):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    o, cg, k, _ = p["w"].shape
    inits = [
        helper.make_tensor("xs", TensorProto.FLOAT, [], [float(SX)]),
        helper.make_tensor("xz", TensorProto.UINT8, [], [ZX]),
        helper.make_tensor("w", TensorProto.UINT8, list(p["w"].shape), p["w"].tobytes(), raw=True),
        helper.make_tensor("ws", TensorProto.FLOAT, [o], p["sw"].tolist()),
        helper.make_tensor("wz", TensorProto.UINT8, [o], p["zw"].astype(np.uint8).tolist()),
        helper.make_tensor("ys", TensorProto.FLOAT, [], [float(p["sy"])]),
        helper.make_tensor("yz", TensorProto.UINT8, [], [ZY]),
    ]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"],
                            strides=[p["stride"]] * 2, pads=[p["pad"]] * 4, group=p["groups"], kernel_shape=[k, k])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(p["x"].shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, {"x": p["x"]})[0]


def sim_paths() -> list:
    """The fast paths this CPU runs, best first ("fast" is the first of them)."""
    return [i for i in _core.integer_available_impls() if i.startswith("fast_")]


def implementations(layer: Layer, batch: int) -> dict:
    """name -> callable for one layer; every output asserted equal to its reference first."""
    p = make_problem(layer, batch)
    impls = {path: (lambda path=path: run_sim(p, path)) for path in sim_paths()}
    impls["fbgemm"] = make_fbgemm(p)
    impls["ort"] = make_ort(p)
    want = impls["ort"]()
    for name, fn in impls.items():
        assert np.array_equal(fn(), want), f"{layer}: {name} disagrees with onnxruntime"
    q = make_problem(layer, batch, random_zw=True)
    best = sim_paths()[0]
    got, ort_q = run_sim(q, best), make_ort(q)()
    assert np.array_equal(got, ort_q), f"{layer}: {best} with random zw disagrees with onnxruntime"
    impls[f"{best} zw random"] = lambda: run_sim(q, best)
    return impls


def set_threads(threads):
    zq.set_num_threads(threads)
    import torch

    torch.set_num_threads(threads)


# ------------------------------------------------------------ pytest-benchmark
BENCH_LAYERS = [(m, layer) for m in MODELS for layer in sorted(model_layers(m))]


@pytest.mark.parametrize("impl", ["fast_avx512vnni", "fast_avxvnni", "fast_avx2", "fbgemm", "ort"])
@pytest.mark.parametrize("model,layer", BENCH_LAYERS, ids=[f"{m}-{lay.cin}to{lay.cout}-{lay.hw}px-k{lay.k}s{lay.stride}"
                                                           f"p{lay.pad}g{lay.groups}" for m, lay in BENCH_LAYERS])
def test_bench_conv(benchmark, model, layer, impl):
    pytest.importorskip("onnxruntime")
    if impl.startswith("fast") and impl not in _core.integer_available_impls():
        pytest.skip(f"{impl} not supported on this CPU")
    set_threads(1)
    impls = implementations(layer, BATCH[model])
    benchmark(impls[impl])


# ------------------------------------------------------------ model table
INNER_CALLS = 3  # back-to-back calls per measurement; the fastest counts (drops preemptions on a busy machine)


def best_of(fn, calls: int) -> float:
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def time_models(models, reps):
    """times[model][impl] = per-repetition model time (s), interleaved over impls and layers."""
    setups = {m: [(layer, count, implementations(layer, BATCH[m])) for layer, count in model_layers(m).items()]
              for m in models}
    names = list(next(iter(setups.values()))[0][2])
    times = {m: {n: np.zeros(reps) for n in names} for m in models}
    layer_times = {m: {n: np.zeros((len(setups[m]), reps)) for n in names} for m in models}
    for r in range(reps):
        for m in models:
            for i, (_, count, impls) in enumerate(setups[m]):
                for n, fn in impls.items():
                    dt = best_of(fn, INNER_CALLS)
                    times[m][n][r] += count * dt
                    layer_times[m][n][i, r] = dt
    gmacs = {m: sum(count * macs(make_problem(layer, BATCH[m])) for layer, count, _ in setups[m]) / 1e9 for m in models}
    return names, times, layer_times, setups, gmacs


def summarize(names, times, gmacs):
    rows = {}
    for m, t in times.items():
        for n in names:
            vs = {ref: t[n] / t[ref] for ref in ("fbgemm", "ort")}
            rows.setdefault(n, {})[m] = dict(
                ms=float(np.median(t[n]) * 1e3), ms_min=float(t[n].min() * 1e3), ms_max=float(t[n].max() * 1e3),
                gmac_s=float(gmacs[m] / np.median(t[n])),
                **{f"vs_{ref}": float(np.median(v)) for ref, v in vs.items()},
                **{f"vs_{ref}_min": float(v.min()) for ref, v in vs.items()},
                **{f"vs_{ref}_max": float(v.max()) for ref, v in vs.items()})
    for per in rows.values():
        per["geomean"] = {f"vs_{ref}": float(np.exp(np.mean([np.log(per[m][f"vs_{ref}"]) for m in times])))
                          for ref in ("fbgemm", "ort")}
    return rows


def markdown(rows, models, layer_times, setups, reps):
    best = sim_paths()[0]
    out = ["# Integer conv simulator paths vs fbgemm and onnxruntime (one thread)", "",
           f"`python bench/bench_integer_conv.py --reps {reps}`; CPU paths available: {', '.join(sim_paths())}; "
           f"`fast` = {best}. Batch: " + ", ".join(f"{m} {BATCH[m]}" for m in models) + ".",
           "Model time = sum over its conv layers; median over repetitions (min .. max). Ratios: median of "
           "per-repetition ratios (min .. max); < 1 = the path is faster. Each layer is called with the same "
           "weights every time: fbgemm and onnxruntime pack them once when the layer is built, the VNNI paths "
           "reuse the packed weights of the layer's `WeightCache` (one per layer, as the integer model holds; "
           "checked against the raw bytes on every call).", "",
           "| path | " + " | ".join(f"{m} ms | {m} / fbgemm | {m} / ort" for m in models) +
           " | geomean / fbgemm | geomean / ort |",
           "|---" * (3 * len(models) + 3) + "|"]
    for n, per in rows.items():
        cells = []
        for m in models:
            c = per[m]
            cells += [f"{c['ms']:.2f} ({c['ms_min']:.2f} .. {c['ms_max']:.2f})",
                      f"{c['vs_fbgemm']:.2f} ({c['vs_fbgemm_min']:.2f} .. {c['vs_fbgemm_max']:.2f})",
                      f"{c['vs_ort']:.2f} ({c['vs_ort_min']:.2f} .. {c['vs_ort_max']:.2f})"]
        g = per["geomean"]
        out.append(f"| {n} | " + " | ".join(cells) + f" | {g['vs_fbgemm']:.2f} | {g['vs_ort']:.2f} |")
    out += ["", f"## Per layer: median ms ({best}, fbgemm, ort) and count", "",
            "| model | C_in -> C_out, HxW, k, stride, pad, groups | count | " + best + " | fbgemm | ort | "
            f"{best} / ort |", "|---" * 7 + "|"]
    for m in models:
        for i, (layer, count, _) in enumerate(setups[m]):
            med = {n: float(np.median(layer_times[m][n][i]) * 1e3) for n in (best, "fbgemm", "ort")}
            out.append(f"| {m} | {layer.cin} -> {layer.cout}, {layer.hw}x{layer.hw}, {layer.k}, {layer.stride}, "
                       f"{layer.pad}, {layer.groups} | {count} | {med[best]:.3f} | {med['fbgemm']:.3f} | "
                       f"{med['ort']:.3f} | {med[best] / med['ort']:.2f} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=str(RESULTS / "integer_conv_paths"), help="writes OUT.md and OUT.json")
    args = ap.parse_args()
    models = args.models.split(",")
    set_threads(1)
    names, times, layer_times, setups, gmacs = time_models(models, args.reps)
    rows = summarize(names, times, gmacs)
    md = markdown(rows, models, layer_times, setups, args.reps)
    print(md)
    Path(args.out + ".md").write_text(md)
    Path(args.out + ".json").write_text(json.dumps(dict(
        reps=args.reps, batch=BATCH, paths=sim_paths(), models=rows,
        layers={m: [dict(layer=layer._asdict(), count=count,
                         median_ms={n: float(np.median(layer_times[m][n][i]) * 1e3) for n in names})
                    for i, (layer, count, _) in enumerate(setups[m])] for m in models}), indent=1))


if __name__ == "__main__":
    main()
