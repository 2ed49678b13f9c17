"""Integer conv simulator speed: fast C++ vs its reference loops vs numpy int64
vs torch fbgemm int8 conv vs onnxruntime QLinearConv, on ResNet-20 and
MobileNetV2 layer shapes (batch 32). Every implementation's codes are asserted
equal to the fast simulator's before anything is timed.

    pytest bench/bench_integer_conv.py --benchmark-only          # pytest-benchmark
    python bench/bench_integer_conv.py [--threads 1] [--reps 7]  # ratio table

Single-threaded by default (--threads 1 for all runtimes), because the ratios
are only stable that way on a shared machine. Activations are drawn in [0, 127]:
fbgemm's AVX2 kernel (vpmaddubsw) saturates int16 pair sums for larger u8*s8
products (torch's observers use reduce_range on x86 for that reason); weight
zero points are 128 (= qint8 zero point 0, the only per-channel zero point
fbgemm accepts) so that all runtimes compute the same thing.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import pytest
from timing import best_time

import pyzeroq as zq
import pyzeroq.integer as zi

BATCH = 32
# name, C_in, C_out, H=W, kernel, stride, groups
SHAPES = [
    ("resnet20 16ch 28x28 3x3", 16, 16, 28, 3, 1, 1),
    ("resnet20 32ch 14x14 3x3", 32, 32, 14, 3, 1, 1),
    ("resnet20 64ch 7x7 3x3", 64, 64, 7, 3, 1, 1),
    ("resnet20 16->32 s2 28x28", 16, 32, 28, 3, 2, 1),
    ("resnet20 32->64 s2 14x14", 32, 64, 14, 3, 2, 1),
    ("mbv2 dw 96ch 14x14", 96, 96, 14, 3, 1, 96),
    ("mbv2 dw 144ch 14x14 s2", 144, 144, 14, 3, 2, 144),
    ("mbv2 dw 192ch 7x7", 192, 192, 7, 3, 1, 192),
    ("mbv2 pw 96->24 14x14", 96, 24, 14, 1, 1, 1),
    ("mbv2 pw 24->144 14x14", 24, 144, 14, 1, 1, 1),
    ("mbv2 pw 192->64 7x7", 192, 64, 7, 1, 1, 1),
]
SX, ZX, SY, ZY = np.float32(0.02), 11, np.float32(0.3), 100


def make_problem(shape, seed=0):
    _, c, o, hw, k, s, g = shape
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 128, (BATCH, c, hw, hw), dtype=np.uint8)
    w = rng.integers(0, 256, (o, c // g, k, k), dtype=np.uint8)
    sw = rng.uniform(0.001, 0.01, o).astype(np.float32)
    zw = np.full(o, 128, np.int64)
    bias = None
    return dict(x=x, w=w, sw=sw, zw=zw, bias=bias, stride=s, pad=k // 2, groups=g,
                sy=np.float32(SY if g == 1 else 0.05))


def macs(p, y):
    o, cg, k, _ = p["w"].shape
    return y.size * cg * k * k


# ------------------------------------------------------------ implementations
def run_sim(p, impl="fast"):
    return zi.qlinear_conv2d(p["x"], SX, ZX, p["w"], p["sw"], p["zw"], p["sy"], ZY, p["bias"], p["stride"],
                             p["pad"], 1, p["groups"], impl=impl)[0]


def run_numpy(p):
    """Independent numpy int64 conv + float32 requantization (ONNX QLinearConv semantics)."""
    x, w, s, pad, g = p["x"], p["w"], p["stride"], p["pad"], p["groups"]
    n, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    xp = np.pad(x.astype(np.int64) - ZX, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    wz = w.astype(np.int64) - p["zw"][:, None, None, None]
    oh, ow = (h + 2 * pad - k) // s + 1, (wd + 2 * pad - k) // s + 1
    og = o // g
    acc = np.zeros((n, o, oh, ow), np.int64)
    xg = xp.reshape(n, g, cg, h + 2 * pad, wd + 2 * pad)
    wg = wz.reshape(g, og, cg, k, k)
    for ki in range(k):
        for kj in range(k):
            patch = xg[:, :, :, ki:ki + s * (oh - 1) + 1:s, kj:kj + s * (ow - 1) + 1:s]
            acc += np.einsum("ngchw,goc->ngohw", patch, wg[:, :, :, ki, kj]).reshape(n, o, oh, ow)
    m = ((SX * p["sw"]).astype(np.float32) / p["sy"]).astype(np.float32)
    v = np.clip(acc.astype(np.float32) * m[None, :, None, None], -ZY, 255 - ZY)
    return (np.rint(v) + ZY).astype(np.uint8)


def make_fbgemm(p):
    import torch
    import torch.ao.nn.quantized as nnq

    warnings.filterwarnings("ignore", category=UserWarning)
    torch.backends.quantized.engine = "fbgemm"
    o, cg, k, _ = p["w"].shape
    qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(p["x"]), float(SX), ZX)
    wi8 = torch.from_numpy((p["w"].astype(np.int16) - 128).astype(np.int8))
    qw = torch._make_per_channel_quantized_tensor(wi8, torch.from_numpy(p["sw"].astype(np.float64)),
                                                  torch.from_numpy(p["zw"] - 128), 0)
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
    pads = [p["pad"]] * 4
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"],
                            strides=[p["stride"]] * 2, pads=pads, group=p["groups"], kernel_shape=[k, k])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(p["x"].shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, {"x": p["x"]})[0]


def implementations(p, threads=1, with_reference=True):
    impls = {"fast": lambda: run_sim(p, "fast")}
    if with_reference:
        impls["reference loops"] = lambda: run_sim(p, "reference")
    impls["numpy int64"] = lambda: run_numpy(p)
    try:
        impls["torch fbgemm"] = make_fbgemm(p)
    except ImportError:
        pass
    try:
        impls["onnxruntime"] = make_ort(p, threads)
    except ImportError:
        pass
    return impls


def set_threads(threads):
    zq.set_num_threads(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


# ------------------------------------------------------------ pytest-benchmark
IMPL_NAMES = ["fast", "reference loops", "numpy int64", "torch fbgemm", "onnxruntime"]


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0].replace(" ", "_") for s in SHAPES])
def test_bench_conv(benchmark, shape, impl):
    set_threads(1)
    p = make_problem(shape)
    impls = implementations(p, with_reference=impl == "reference loops")
    if impl not in impls:
        pytest.skip(f"{impl} not installed")
    want = impls["fast"]()
    assert np.array_equal(impls[impl](), want), f"{impl} disagrees with the simulator"
    benchmark.extra_info["gmacs"] = macs(p, want) / 1e9
    benchmark(impls[impl])


# ------------------------------------------------------------ ratio table
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="1 (default) or 0 = all cores")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-reference", action="store_true", help="skip the slow reference loops")
    args = ap.parse_args()
    set_threads(args.threads)
    cols = ["fast", "reference loops", "numpy int64", "torch fbgemm", "onnxruntime"]
    print(f"threads={args.threads}, batch {BATCH}, best of {args.reps}; ms (GMAC/s); ratio = time / fast time\n")
    print("| layer | " + " | ".join(cols) + " | fast/fbgemm | fast/ort |")
    print("|---" * (len(cols) + 3) + "|")
    ratios = []
    for shape in SHAPES:
        p = make_problem(shape)
        impls = implementations(p, args.threads, with_reference=not args.no_reference)
        want = impls["fast"]()
        for name, fn in impls.items():
            assert np.array_equal(fn(), want), f"{shape[0]}: {name} disagrees with the simulator"
        gm = macs(p, want) / 1e9
        times = {name: best_time(fn, 1 if name in ("reference loops", "numpy int64") else args.reps)
                 for name, fn in impls.items()}
        cells = [f"{times[c] * 1e3:.2f} ({gm / times[c]:.1f})" if c in times else "-" for c in cols]
        r_fb = times["fast"] / times["torch fbgemm"] if "torch fbgemm" in times else float("nan")
        r_ort = times["fast"] / times["onnxruntime"] if "onnxruntime" in times else float("nan")
        ratios.append(r_fb)
        print(f"| {shape[0]} | " + " | ".join(cells) + f" | {r_fb:.2f} | {r_ort:.2f} |", flush=True)
    print(f"\ngeometric mean fast/fbgemm time ratio: {float(np.exp(np.mean(np.log(ratios)))):.2f}")


if __name__ == "__main__":
    main()
