"""Block reconstruction (pyzeroq.reconstruct): AdaRound's rectified sigmoid, regularizer and
final rounding against numpy formulas; blocks found in the fx graph; the learned codes in the
shared record (layer_record, to_integer >= 99.9 % top-1 agreement, ONNX == integer model);
the guard; determinism; config validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_accuracy_options import calibrated_graph
from test_zoo import check_integer_paths
from zoo import ZOO, build

import pyzeroq as zq
from pyzeroq import models
from pyzeroq.config import ReconstructionConfig
from pyzeroq.modules import layer_records, prepare, quant_layers
from pyzeroq.reconstruct import (
    GAMMA,
    ZETA,
    AdaRoundWeight,
    beta_at,
    find_blocks,
    init_rounding,
    reconstruct,
    rectified_sigmoid,
    round_regularizer,
    rounding_codes,
)

FAST_RECON = ReconstructionConfig(iters=12, batch_size=8, guard_samples=0)


def np_h(v):
    return np.clip(1.0 / (1.0 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def test_rectified_sigmoid_and_regularizer_match_numpy():
    v = torch.linspace(-8, 8, 257, dtype=torch.float64)
    np.testing.assert_allclose(rectified_sigmoid(v).numpy(), np_h(v.numpy()), rtol=0, atol=1e-12)
    assert rectified_sigmoid(torch.tensor([-50.0, 50.0])).tolist() == [0.0, 1.0]  # clipped, not asymptotic
    h = np_h(v.numpy())
    for beta in (20.0, 7.5, 2.0):
        want = np.sum(1.0 - np.abs(2.0 * h - 1.0) ** beta)
        assert float(round_regularizer(torch.from_numpy(h), beta)) == pytest.approx(want, rel=1e-12)
    assert float(round_regularizer(torch.tensor([0.0, 1.0, 1.0]), 2.0)) == 0.0


def test_init_rounding_gives_the_fractional_part():
    frac = torch.rand(1000, dtype=torch.float64) * 0.999
    np.testing.assert_allclose(rectified_sigmoid(init_rounding(frac)).numpy(), frac.numpy(), atol=1e-9)


def test_beta_schedule():
    cfg = ReconstructionConfig(iters=100, warmup=0.2, beta_start=20.0, beta_end=2.0)
    assert [beta_at(s, cfg) for s in (0, 19)] == [None, None]
    assert beta_at(20, cfg) == 20.0
    assert beta_at(99, cfg) == pytest.approx(2.0 + 18.0 / 80)
    betas = [beta_at(s, cfg) for s in range(20, 100)]
    assert all(a > b for a, b in zip(betas, betas[1:]))


def test_adaround_weight_codes_are_floor_or_floor_plus_one():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 3, 3, 3, generator=gen)
    scale, zp = zq.ops.asymmetric_params(w.reshape(6, -1), 3, axis=0)
    scale, zp = torch.as_tensor(scale), torch.as_tensor(zp, dtype=torch.int64)
    r = AdaRoundWeight(w, scale, zp, 0, 7)
    # initial soft weight = w inside the range (h(V) = fractional part)
    inside = (w / scale.view(-1, 1, 1, 1) + zp.view(-1, 1, 1, 1) >= 0) & \
        (w / scale.view(-1, 1, 1, 1) + zp.view(-1, 1, 1, 1) <= 7)
    torch.testing.assert_close(r(w)[inside], w[inside], atol=1e-5, rtol=0)
    with torch.no_grad():
        r.v.copy_(torch.randn(r.v.shape, generator=gen) * 3)
    up = (r.v.detach() >= 0).numpy()
    want = rounding_codes(w.numpy(), scale.numpy(), zp.numpy(), up, 0, 7)
    np.testing.assert_array_equal(r.codes().numpy(), want)
    floor = np.floor(w.numpy() / scale.numpy().reshape(-1, 1, 1, 1)) + zp.numpy().reshape(-1, 1, 1, 1)
    unclamped = (floor >= 0) & (floor + 1 <= 7)
    delta = want - floor
    assert set(np.unique(delta[unclamped])) <= {0.0, 1.0} and (delta[unclamped] == 1).any()
    # the hard weight is the record's dequantization: its quantization gives the codes back
    record = zq.qspec.TensorQuant(3, scale.numpy(), zp.numpy(), 0)
    r.hard = True
    hard = r(w).detach()
    np.testing.assert_array_equal(hard.numpy(), record.dequantize(want.astype(np.uint8)))
    np.testing.assert_array_equal(record.quantize(hard.numpy()), want)


def test_find_blocks_resnet20_residual_blocks():
    gm, info = prepare(models.load_pretrained("resnet20"), 4)
    layers = list(info.layers)
    spans = find_blocks(gm, layers, torch.rand(2, 1, 28, 28))
    blocks = [layers[a:b] for a, b in spans]
    assert blocks[0] == ["stem.0", "blocks.0.conv1.0", "blocks.0.conv2.0"]  # the stem joins block 0
    assert blocks[3] == ["blocks.3.conv1.0", "blocks.3.conv2.0", "blocks.3.shortcut.0"]
    assert blocks[-1] == ["blocks.8.conv1.0", "blocks.8.conv2.0", "fc"]  # the classifier joins the last one
    assert len(blocks) == 9 and sum(blocks, []) == layers


def _calib(n=16, seed=0):
    """Uniform noise images [n, 1, 28, 28] (calibration stand-ins; real images only evaluate)."""
    return torch.rand((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnet20_recon():
    """ResNet-20 W3A4 with and without a short reconstruction (Gaussian calibration: fast)."""
    torch.set_num_threads(1)
    base = dict(weight_bits=3, act_bits=4, act_range="mse", weight_range="mse", calibration="gaussian",
                num_samples=32, progress=False)
    model = models.load_pretrained("resnet20")
    plain = zq.quantize(model, zq.QuantConfig(**base), input_shape=(1, 28, 28))
    rec = ReconstructionConfig(iters=20, batch_size=16, guard_samples=0)
    q = zq.quantize(model, zq.QuantConfig(**base, reconstruction=rec), input_shape=(1, 28, 28))
    return model, plain, q


def test_reconstruction_codes_live_in_the_record(resnet20_recon):
    _, plain, q = resnet20_recon
    res = q.report.reconstruction
    assert res["kept"] and len(res["blocks"]) == 9 and all(0 < f < 0.5 for f in res["flipped"])
    assert all(after < before for before, after in res["block_loss"])
    recs, plain_recs = layer_records(q.graph_module), layer_records(plain.graph_module)
    changed = 0
    for name, layer in quant_layers(q.graph_module).items():
        r = recs[name]
        assert r.weight == plain_recs[name].weight  # same scales / zero points: only the rounding is learned
        # the float weight is exactly the dequantized codes: fake quantization leaves it unchanged
        w = layer.weight.detach().numpy()
        np.testing.assert_array_equal(r.weight.dequantize(r.weight_codes), w)
        np.testing.assert_array_equal(layer.quantized_weight().detach().numpy(), w)
        diff = r.weight_codes.astype(np.int64) - plain_recs[name].weight_codes.astype(np.int64)
        assert np.abs(diff).max() <= 1  # floor or floor + 1 of the same grid
        changed += int((diff != 0).sum())
    assert changed > 0


def test_reconstruction_integer_agreement_and_onnx(resnet20_recon, tmp_path):
    """to_integer agrees with the fake-quant model on >= 99.9 % of 2,000 real images (the embedded
    test subset), and onnxruntime on export_onnx equals the integer model bit for bit."""
    ort = pytest.importorskip("onnxruntime")
    _, _, q = resnet20_recon
    images, _ = zq.data.load_fashion_mnist("embedded")
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    im = zq.to_integer(q)
    with torch.no_grad():
        fake = q(x).argmax(1)
    integer = im(x).argmax(1)
    assert (fake == integer).float().mean().item() >= 0.999
    model = zq.export_onnx(q, tmp_path / "r.onnx", x[:1])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    (onnx_out,) = sess.run(None, {sess.get_inputs()[0].name: x[:64].numpy()})
    np.testing.assert_array_equal(onnx_out, im(x[:64]).numpy())


def test_reconstruction_zoo_model_integer_paths(tmp_path):
    """A zoo model (MobileNetV2-style, inverted residuals) through every integer path."""
    shape = ZOO["mobilenetv2"][1]
    cfg = zq.QuantConfig(weight_bits=4, act_bits=8, calibration="gaussian", num_samples=8, progress=False,
                         reconstruction=FAST_RECON)
    q = zq.quantize(build("mobilenetv2"), cfg, input_shape=shape)
    assert len(q.report.reconstruction["blocks"]) > 3
    check_integer_paths(q, torch.rand((8, *shape), generator=torch.Generator().manual_seed(1)),
                        tmp_path / "m.onnx")


def test_reconstruction_deterministic_and_model_untouched():
    model = models.load_pretrained("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _calib(24)

    def run(seed):
        cfg = zq.QuantConfig(weight_bits=3, act_bits=4, calibration="real", calibration_data=data, num_samples=16,
                             progress=False, reconstruction=ReconstructionConfig(iters=10, batch_size=8, seed=seed,
                                                                                 guard_samples=8))
        return zq.quantize(model, cfg, input_shape=(1, 28, 28))

    a, b, c = run(0), run(0), run(1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))
    assert a.report.reconstruction["guard_kl_after"] == b.report.reconstruction["guard_kl_after"]
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if k.endswith("weight") and isinstance(sa[k], torch.Tensor))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_guard_rejects_a_destroyed_rounding():
    """A huge learning rate scrambles the rounding: the held-out KL rises, the guard restores the
    round-to-nearest weights (bit for bit the model without reconstruction)."""
    data = _calib(16)
    gm, layers = calibrated_graph(models.load_pretrained("resnet20"), data, 4, weight_bits=3, act_range="minmax")
    weights = {n: m.weight.detach().clone() for n, m in quant_layers(gm).items()}
    cfg = ReconstructionConfig(iters=5, lr=50.0, batch_size=8, reg_weight=0.0)
    res = reconstruct(gm, layers, data, cfg, holdout=_calib(16, seed=5))
    assert not res.kept and res.guard_kl_after >= res.guard_kl_before
    assert all(torch.equal(m.weight, weights[n]) for n, m in quant_layers(gm).items())


def test_guard_measures_against_the_float_weights():
    """The guard's "after" KL compares with the float model's outputs taken before the reconstruction:
    with no code flipped it equals the "before" KL exactly, and scrambled codes are rejected (the
    reference was once taken after the codes were written into the weights, so it measured the
    quantized weights against themselves and kept ruinous roundings)."""
    data, holdout = _calib(16), _calib(16, seed=5)
    gm, layers = calibrated_graph(models.load_pretrained("resnet20"), data, 4, weight_bits=3, act_range="minmax")
    still = reconstruct(gm, layers, data, ReconstructionConfig(iters=3, lr=1e-12, batch_size=8), holdout=holdout)
    assert max(still.flipped) == 0 and still.guard_kl_after == still.guard_kl_before and not still.kept
    gm, layers = calibrated_graph(models.load_pretrained("resnet20"), data, 4, weight_bits=3, act_range="minmax")
    scrambled = reconstruct(gm, layers, data, ReconstructionConfig(iters=20, lr=1e3, batch_size=8), holdout=holdout)
    assert max(scrambled.flipped) > 0.2 and not scrambled.kept
    assert scrambled.guard_kl_after > scrambled.guard_kl_before


@pytest.mark.parametrize("kwargs, match", [
    (dict(iters=0), "reconstruction.iters"), (dict(lr=-1.0), "reconstruction.lr"),
    (dict(reg_weight=float("nan")), "reconstruction.reg_weight"), (dict(warmup=1.0), "reconstruction.warmup"),
    (dict(batch_size=2.5), "reconstruction.batch_size"), (dict(seed=-1), "reconstruction.seed"),
    (dict(guard_samples=-1), "reconstruction.guard_samples"), (dict(blocks=(("a",), ())), "reconstruction.blocks"),
    (dict(beta_end=0), "reconstruction.beta_end"), (dict(guard_data="real"), "reconstruction.guard_data"),
])
def test_reconstruction_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReconstructionConfig(**kwargs)


def test_quant_config_validation():
    with pytest.raises(TypeError, match="reconstruction"):
        zq.QuantConfig(reconstruction={"iters": 5})
    with pytest.raises(ValueError, match="weight_range"):
        zq.QuantConfig(weight_range="max")
    with pytest.raises(ValueError, match="sensitivity_act_quant"):
        zq.QuantConfig(act_bits=None, sensitivity_act_quant=True)
    with pytest.raises(ValueError, match="distill_relax"):
        zq.QuantConfig(distill_relax=-0.1)


def test_user_blocks_checked_before_calibration(monkeypatch):
    import pyzeroq.pipeline as pipeline

    def boom(*a, **k):
        raise AssertionError("calibration data computed before the blocks were checked")

    monkeypatch.setattr(pipeline, "calibration_data", boom)
    cfg = zq.QuantConfig(weight_bits=4, progress=False, reconstruction=ReconstructionConfig(blocks=(("stem.0",),)))
    with pytest.raises(ValueError, match="reconstruction.blocks"):
        zq.quantize(models.load_pretrained("resnet20"), cfg, input_shape=(1, 28, 28))


def test_user_blocks_are_used():
    model = models.load_pretrained("resnet20")
    _, info = prepare(model, 4)
    layers = list(info.layers)
    blocks = (tuple(layers[:11]), tuple(layers[11:]))
    cfg = zq.QuantConfig(weight_bits=4, act_bits=8, calibration="gaussian", num_samples=8, progress=False,
                         reconstruction=ReconstructionConfig(iters=3, batch_size=4, guard_samples=0, blocks=blocks))
    q = zq.quantize(model, cfg, input_shape=(1, 28, 28))
    assert q.report.reconstruction["blocks"] == [list(b) for b in blocks]


def test_qdrop_hook_mixes_float_and_quantized():
    from pyzeroq.reconstruct import _qdrop_hook

    x, out = torch.zeros(10000), torch.ones(10000)
    with torch.enable_grad():
        mixed = _qdrop_hook(0.3, torch.Generator().manual_seed(0))(None, (x,), out)
        assert torch.equal(_qdrop_hook(1.0, torch.Generator())(None, (x,), out), x)
        assert torch.equal(_qdrop_hook(0.0, torch.Generator())(None, (x,), out), out)
    assert abs(float((mixed == 0).float().mean()) - 0.3) < 0.02
    with torch.no_grad():  # evaluation (the hard rounding, the next block's input): always quantized
        assert torch.equal(_qdrop_hook(1.0, torch.Generator())(None, (x,), out), out)
    with pytest.raises(ValueError, match="reconstruction.drop_prob"):
        ReconstructionConfig(drop_prob=1.5)
