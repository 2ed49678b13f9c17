"""Integer-only detectors: a QAT detector converted by ``to_quantized_model`` goes through
``to_integer``, ``integer_exact`` and ``export_onnx``; the integer model equals the integer-exact
fake quantization code for code, onnxruntime equals the integer model bit for bit, the converted
fake-quant model stays close to the QAT detector's own fake quantization."""

import numpy as np
import pytest
import torch
from torch import nn

import pyzeroq as zq
from pyzeroq.detection import FCOSDetector, QATConfig
from pyzeroq.detection.integer import as_detector, onnx_runner, to_quantized_model
from pyzeroq.detection.qat import prepare_qat, run_qat
from pyzeroq.integer.drift import code_drift
from pyzeroq.outputs import output_leaves
from pyzeroq.pipeline import QuantizedModel

CANVAS = 32
pytestmark = pytest.mark.usefixtures("one_thread")
# converted vs QAT fake quant: BN folded, the QAT's float tensors (pre-add conv outputs, sums,
# head outputs) at 8 bits, shared tensors on one range; relative to each output's range
MAX_CONVERSION_ERROR = 0.1


def _detector() -> FCOSDetector:
    torch.manual_seed(0)
    det = FCOSDetector(widths=(4, 4, 8, 8, 8), fpn_width=8, head_convs=1, input_size=CANVAS)
    gen = torch.Generator().manual_seed(3)
    for m in det.modules():
        if isinstance(m, nn.BatchNorm2d):  # BN statistics and some negative gammas (mirrored weight codes)
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.copy_(torch.empty_like(m.weight).uniform_(-1.5, 1.5, generator=gen))
    for conv in (det.cls_out, det.reg_out, det.ctr_out, *det.cls_convs, *det.reg_convs):
        nn.init.normal_(conv.weight, std=0.2)
    with torch.no_grad():
        det.scales[1].scale.fill_(-0.7)  # a negative level scale folds like a negative gamma
    return det.eval()


@pytest.fixture(scope="module")
def qat_setup():
    torch.set_num_threads(1)
    fp = _detector()
    images = torch.rand((8, 1, CANVAS, CANVAS), generator=torch.Generator().manual_seed(1))
    cfg = QATConfig(weight_bits=4, act_bits=8, steps=2, batch_size=4)
    qat = prepare_qat(fp, cfg)
    run_qat(qat, fp, images, None, cfg, progress=False)
    return qat, images


def test_converted_qat_detector_is_integer_exact_and_matches_onnxruntime(qat_setup, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    qat, images = qat_setup
    before = {k: v.clone() for k, v in qat.state_dict().items() if isinstance(v, torch.Tensor)}
    qmodel = to_quantized_model(qat, images)
    assert all(torch.equal(v, qat.state_dict()[k]) for k, v in before.items())  # the QAT detector is untouched
    assert isinstance(qmodel, QuantizedModel) and qmodel.report.folded_bn
    rep = qmodel.report  # sizes were left 0
    assert set(rep.params) == set(rep.layers) and 0 < rep.size_bytes < rep.fp_size_bytes
    im = zq.to_integer(qmodel)
    exact = zq.integer_exact(qmodel)
    x = torch.rand((4, 1, CANVAS, CANVAS), generator=torch.Generator().manual_seed(5))
    drift = code_drift(exact, im, x)
    assert drift.layers and all(d.differing == 0 for d in drift.layers), drift.to_markdown()
    with torch.no_grad():
        for e, g in zip(output_leaves(exact(x)), output_leaves(im(x))):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
    zq.export_onnx(qmodel, tmp_path / "det.onnx", x[:1])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    sess = ort.InferenceSession(str(tmp_path / "det.onnx"), so, providers=["CPUExecutionProvider"])
    onnx_out = onnx_runner(sess, im.output)(x)
    for a, b in zip(output_leaves(onnx_out), output_leaves(im(x))):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    loaded = zq.load(qmodel.save(tmp_path / "det.pzq"))  # the shared save / load, exact round trip
    with torch.no_grad():
        for a, b in zip(output_leaves(loaded(x)), output_leaves(qmodel(x))):
            assert torch.equal(a, b)
    # the detector protocol on every form: predict decodes the integer model's output as the QAT one's
    preds = as_detector(im, qat).predict(x)
    assert len(preds) == len(x) and set(preds[0]) == {"boxes", "scores", "labels"}


def test_weight_codes_are_the_qat_codes_and_outputs_stay_close(qat_setup):
    qat, images = qat_setup
    qmodel = to_quantized_model(qat, images)
    layers = dict(qat.named_modules())
    flat = {n.replace(".", "_"): m for n, m in layers.items()}  # shared-layer copies: "<path with _>_call<i>"
    for name, layer in zq.modules.quant_layers(qmodel.graph_module).items():
        src = layers[name] if name in layers else flat[name.rsplit("_call", 1)[0]]
        rec, qrec = layer.weight_quant.record(), src.weight_quant.record()
        codes = rec.quantize(layer.weight.detach().numpy())
        qcodes = qrec.quantize(src.weight.detach().numpy())
        mirrored = qrec.qmin + qrec.qmax - qcodes
        same = (codes == qcodes) | (codes == mirrored)
        assert same.mean() == 1.0, name
    x = torch.rand((4, 1, CANVAS, CANVAS), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for a, b in zip(output_leaves(qmodel(x)), output_leaves(qat(x))):
            span = float(b.max() - b.min()) or 1.0
            assert float((a - b).abs().max()) <= MAX_CONVERSION_ERROR * span


def test_to_quantized_model_errors(qat_setup):
    qat, images = qat_setup
    with pytest.raises(ValueError, match="QAT detector"):
        to_quantized_model(_detector(), images)
    with pytest.raises(TypeError, match="images"):
        to_quantized_model(qat, images.numpy())
    with pytest.raises(ValueError, match="images"):
        to_quantized_model(qat, images[0])
    with pytest.raises(ValueError, match="extra_bits"):
        to_quantized_model(qat, images, extra_bits=16)
    with pytest.raises(ValueError, match="act_range"):
        to_quantized_model(qat, images, act_range="max")
    float_head = prepare_qat(_detector(), QATConfig(head_bits=None, steps=0))
    run_qat(float_head, _detector(), images, None, QATConfig(head_bits=None, steps=0), progress=False)
    with pytest.raises(ValueError, match="head_bits"):
        to_quantized_model(float_head, images)
    with pytest.raises(TypeError, match="callable"):
        as_detector(3, qat)
