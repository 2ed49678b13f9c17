"""The hypothesis graph fuzzer (tests/test_fuzz_pipeline.py, bench/fuzz_pipeline.py,
tests/test_fuzz_regressions.py): random small networks from README's "Supported operators"
table through quantize -> to_integer -> export_onnx -> onnxruntime. This module is the one
import of the fuzzer (``import graph_strategies as gs``); it re-exports the parts:

* :mod:`graph_spec` -- the network spec: frozen dataclasses per op (their ``repr`` is a
  constructor call, so a shrunk failure prints a complete reproduction), :class:`Case`, the
  shape rules;
* :mod:`graph_weights` -- extreme weights: per-layer :class:`Init` / :class:`BN` recipes (seeded
  numpy draws: per output channel a normal scale from 1e-9 to 1e3, mixtures within a layer,
  all-zero and constant channels, BN with tiny running variances and zero gammas);
* :mod:`graph_net` -- :class:`FuzzNet`, the fx-traceable module of a spec (``forward`` loops over
  the fixed op list: fx unrolls it at trace time);
* :mod:`graph_ops` -- the strategies :func:`graphs` / :func:`cases`;
* :mod:`graph_checks` -- building a case and the properties checked on it (:func:`check_case`,
  :func:`check_quantized`), known-issue classification.

The ops drawn: input Normalize + quantize (images [C, H, W]); Conv2d (+BN folded, +ReLU /
ReLU6 fused; groups / depthwise, stride, zero padding incl. "same", dilation, with or without
bias); residual add (+ReLU / ReLU6); AdaptiveAvgPool2d(1), AvgPool2d (count_include_pad),
MaxPool2d; standalone ReLU / ReLU6; the lookup-table activations (Hardswish, Hardsigmoid, SiLU,
GELU, Sigmoid, Tanh, LeakyReLU, Hardtanh as modules, functions and methods); flatten / view /
reshape / nn.Flatten; Identity / Dropout; hidden Linear (+ReLU / ReLU6 / lookup); the final
Linear (float logits); torch.cat (any dim, 2-3 inputs, the same value twice too); functional
pools and spatial means (F.max_pool2d / F.avg_pool2d / F.adaptive_avg_pool2d(x, 1),
x.mean((2, 3)) [keepdim]). A new op goes into :mod:`graph_spec`, :class:`FuzzNet` and
:func:`graphs` when it lands.
"""

from __future__ import annotations

from graph_checks import (
    BATCH,
    KNOWN_ISSUES,
    UNSUPPORTED,
    KnownIssue,
    Outcome,
    Unsupported,
    build,
    check_case,
    check_onnx,
    check_quantized,
    check_roundtrip,
    classify,
    dequantize,
    float_slack,
    fq_codes,
    images,
    leaves,
    local_compare,
    output_slots,
)
from graph_net import FuzzNet
from graph_ops import ACTS, FLATTEN_STYLES, LOOKUPS, acts, cases, convs, graphs, num_layers
from graph_spec import (
    BN,
    SPECIAL_IMAGES,
    Act,
    Add,
    Case,
    Cat,
    Conv,
    Flatten,
    GraphSpec,
    Init,
    Linear,
    Op,
    Passthrough,
    Pool,
    conv_out,
    infer_shapes,
)
from graph_weights import REGIMES, SCALES, VARIANCES, bns, inits

__all__ = [
    "BATCH", "KNOWN_ISSUES", "UNSUPPORTED", "KnownIssue", "Outcome", "Unsupported", "build", "check_case", "check_onnx",
    "check_quantized", "check_roundtrip", "classify", "dequantize", "float_slack", "fq_codes", "images", "leaves",
    "local_compare", "output_slots", "FuzzNet", "ACTS", "FLATTEN_STYLES", "LOOKUPS", "acts", "cases", "convs", "graphs",
    "num_layers", "BN", "SPECIAL_IMAGES", "Act", "Add", "Case", "Cat", "Conv", "Flatten", "GraphSpec", "Init", "Linear",
    "Op", "Passthrough", "Pool", "conv_out", "infer_shapes", "REGIMES", "SCALES", "VARIANCES", "bns", "inits",
]
