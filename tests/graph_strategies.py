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

The ops drawn (README's table; :mod:`graph_ops` says which op reads which rank):

* input Normalize + quantize: images [C, H, W], or (1 in 6) signals [C, L];
* Conv2d / Conv1d (+BN2d / BN1d folded, +ReLU / ReLU6 fused; groups / depthwise, stride, zero
  padding incl. "same", dilation, with or without bias); ConvTranspose2d (groups 1; stride,
  padding, output_padding, dilation; +BN, +act); standalone BatchNorm2d / BatchNorm1d (on [F] and
  [C, L] too); hidden Linear on [N, ..., F] (+ReLU / ReLU6 / lookup); the final Linear (float
  logits, also on [N, ..., F]);
* residual add (+ReLU / ReLU6); ``*`` / torch.mul of two tensors, broadcast (squeeze-excite
  gating x * sigmoid(conv(pool(x))) / x * hardsigmoid(fc(mean(x))).view(b, -1, 1, 1), spatial
  gates);
* AdaptiveAvgPool2d(1) / (k) with k dividing the input, AdaptiveAvgPool1d(1), AvgPool2d
  (count_include_pad), MaxPool2d (ceil_mode too); functional pools and spatial means
  (F.max_pool2d / F.avg_pool2d / F.adaptive_avg_pool2d / F.adaptive_avg_pool1d, x.mean((2, 3))
  [keepdim]);
* standalone ReLU / ReLU6; the lookup-table activations (Hardswish, Hardsigmoid, SiLU, GELU,
  Sigmoid, Tanh, LeakyReLU, Hardtanh as modules, functions and methods);
* flatten / view / reshape / nn.Flatten; view / reshape with sizes from ``x.size()`` /
  ``x.shape`` and ``// * + -`` (of the tensor or of another one); ShuffleNet's channel shuffle;
  permute / transpose (and back), contiguous, chunk / split items, nearest upsample by integer
  factors (nn.Upsample, F.interpolate), zero padding (nn.ZeroPad2d, F.pad); Identity / Dropout;
  torch.cat (any dim, 2-3 inputs, the same value twice too);
* outputs: one logits tensor, a map (conv head), or a tuple / list / dict (nested too) of logits,
  extra heads and intermediate values;
* configs: uniform weight bits 2..8, per-layer bits, mixed precision (weight_bits=(2, 4, 8) with
  avg_weight_bits), act bits 2..8, and the presets W8A8, W4A4, W4A8, MP4 (A8 / A4), MP3.

A new op goes into :mod:`graph_spec`, :class:`FuzzNet` and :mod:`graph_ops` when it lands.
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
from graph_ops import ACTS, FLATTEN_STYLES, GATES, LOOKUPS, PRESETS, acts, cases, convs, graphs, num_layers
from graph_spec import (
    BN,
    LAYERS,
    SPECIAL_IMAGES,
    Act,
    Add,
    Case,
    Cat,
    Conv,
    Conv1d,
    ConvT,
    Flatten,
    GraphSpec,
    Init,
    Layout,
    Linear,
    Mul,
    Norm,
    Op,
    Out,
    Passthrough,
    Pool,
    Reshape,
    Shuffle,
    conv_out,
    infer_shapes,
    returned,
)
from graph_weights import REGIMES, SCALES, VARIANCES, bns, inits

# the names a spec's / case's repr uses: eval(repr(case), {k: getattr(gs, k) for k in gs.SPEC_NAMES})
SPEC_NAMES = ("Case", "GraphSpec", "Out", "Init", "BN", "Conv", "Conv1d", "ConvT", "Norm", "Add", "Mul", "Pool", "Cat",
              "Act", "Passthrough", "Flatten", "Linear", "Layout", "Reshape", "Shuffle")

__all__ = [
    "BATCH", "KNOWN_ISSUES", "UNSUPPORTED", "KnownIssue", "Outcome", "Unsupported", "build", "check_case", "check_onnx",
    "check_quantized", "check_roundtrip", "classify", "dequantize", "float_slack", "fq_codes", "images", "leaves",
    "local_compare", "output_slots", "FuzzNet", "ACTS", "FLATTEN_STYLES", "GATES", "LOOKUPS", "PRESETS", "acts", "cases",
    "convs", "graphs", "num_layers", "BN", "LAYERS", "SPECIAL_IMAGES", "Act", "Add", "Case", "Cat", "Conv", "Conv1d",
    "ConvT", "Flatten", "GraphSpec", "Init", "Layout", "Linear", "Mul", "Norm", "Op", "Out", "Passthrough", "Pool",
    "Reshape", "Shuffle", "conv_out", "infer_shapes", "returned", "REGIMES", "SCALES", "VARIANCES", "bns", "inits",
    "SPEC_NAMES",
]
