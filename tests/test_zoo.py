"""The model zoo (tests/zoo.py) end to end at W8A8, W4A8 and MP4: no float op, ``to_integer``,
``export_onnx``, onnxruntime equal to the integer model bit for bit, the integer-exact mode
(``zq.integer_exact``) equal to it code for code, the default fake-quant model close to it (same
top-1 on most images; few activation codes differ, each by a step or two)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zoo import ZOO, build

import pyzeroq as zq
from pyzeroq.export import output_names
from pyzeroq.integer.drift import code_drift
from pyzeroq.outputs import output_leaves

CONFIGS = {
    "W8A8": dict(weight_bits=8, act_bits=8),
    "W4A8": dict(weight_bits=4, act_bits=8),
    # the grouped search (Appendix A) is the costly part of MP: on two models only (GROUPED_SEARCH)
    "MP4": dict(weight_bits=(2, 4, 8), avg_weight_bits=4, act_bits=8, mp_relaxation=False),
}
GROUPED_SEARCH = dict(mp_relaxation=True, mp_size_bins=20, mp_eval_samples=4)
GROUPED_SEARCH_MODELS = ("mobilenetv3_small", "two_heads")
FAST = dict(calibration="gaussian", num_samples=8, progress=False)
BATCH = 8
MIN_TOP1_AGREEMENT = 0.75  # integer vs fake-quant: conv requantization near-ties move a few codes
MAX_CODE_DIFF_FRACTION = 0.02  # of all activation codes (default fake-quant vs integer)
MAX_DRIFT_STEPS = 4  # a differing code is amplified by later gains (DenseNet's BN-as-conv: up to 4 steps)


def inputs(shape, n: int = BATCH) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(1))


def check_integer_paths(q, x: torch.Tensor, onnx_path) -> None:
    """``to_integer(q)`` against the fake-quant model (top-1 agreement, code drift bounded),
    ``integer_exact(q)`` (equal code for code) and onnxruntime on ``export_onnx(q)`` (bit for bit)."""
    ort = pytest.importorskip("onnxruntime")
    im = zq.to_integer(q)
    with torch.no_grad():
        fq = output_leaves(q(x))
    got = output_leaves(im(x))
    for f, g in zip(fq, got):
        assert f.shape == g.shape
        if g.dim() == 2:  # logits
            assert (f.argmax(1) == g.argmax(1)).float().mean() >= MIN_TOP1_AGREEMENT
    # every activation code (returned maps included) within a few steps of the default fake-quant model's
    drift = code_drift(q, im, x)
    assert drift.max_distance <= MAX_DRIFT_STEPS, drift.to_markdown()
    assert sum(d.differing for d in drift.layers) <= MAX_CODE_DIFF_FRACTION * sum(d.codes for d in drift.layers)
    # zq.integer_exact: the fake-quant graph with the integer arithmetic, equal to it code for code
    exact = zq.integer_exact(q)
    drift = code_drift(exact, im, x)
    assert drift.layers and all(d.differing == 0 for d in drift.layers), drift.to_markdown()
    with torch.no_grad():
        for g, e in zip(got, output_leaves(exact(x))):
            np.testing.assert_array_equal(e.numpy(), g.numpy())
    model = zq.export_onnx(q, onnx_path, x[:1])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    env = im.run(x.numpy())
    names = [o.name for o in sess.get_outputs()]
    slots = dict(output_names(im.output))
    for out_name, value in zip(names, sess.run(None, {"input": x.numpy()})):
        np.testing.assert_array_equal(value, env[slots[out_name]], err_msg=out_name)


@pytest.fixture(scope="module", params=sorted(ZOO))
def name(request):
    return request.param


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_zoo_model(name, config, tmp_path):
    shape = ZOO[name][1]
    settings = {**CONFIGS[config], **(GROUPED_SEARCH if config == "MP4" and name in GROUPED_SEARCH_MODELS else {})}
    q = zq.quantize(build(name), zq.QuantConfig(**settings, **FAST), input_shape=shape)
    assert q.report.float_ops == []
    if config == "MP4":
        assert set(q.bit_widths.values()) <= {2, 4, 8}
        assert (q.report.relaxation is not None) == settings["mp_relaxation"]
    check_integer_paths(q, inputs(shape), tmp_path / f"{name}.onnx")


def test_code_drift_report():
    """to_integer(..., drift_images=x) reports, per activation quantizer, the codes where the
    fake-quant model and the integer model differ; checked against a direct comparison."""
    from test_integer_convert import fq_codes

    shape = ZOO["resnet18"][1]
    q = zq.quantize(build("resnet18"), zq.QuantConfig(**CONFIGS["W8A8"], **FAST), input_shape=shape)
    x = inputs(shape)
    im = zq.to_integer(q, drift_images=x)
    drift = im.drift
    quantizing = [n for n, m in q.graph_module.named_modules() if type(m).__name__ == "QuantAct" and m.mode == "quantize"]
    assert [d.quantizer for d in drift.layers] == quantizing and drift.images == BATCH
    codes, _ = fq_codes(q, x)
    env = im.run(x.numpy())
    for d in drift.layers:
        diff = np.abs(env[d.slot].astype(np.int64).reshape(codes[d.quantizer].shape) - codes[d.quantizer])
        assert (d.differing, d.max_distance, d.codes) == (int((diff > 0).sum()), int(diff.max()), diff.size)
    assert drift.layers[0].differing == 0  # the input quantization is the same float32 formula
    assert all(d.fraction <= MAX_CODE_DIFF_FRACTION for d in drift.layers)
    assert "| quantizer |" in drift.to_markdown()
    with pytest.raises(TypeError, match="float images"):
        zq.to_integer(q, drift_images=(x * 255).to(torch.uint8))

