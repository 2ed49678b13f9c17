"""Integer model save / load (torch.load weights_only), pickling and deep copies: bit-exact."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from test_integer_convert import ToyNet, images, quantize, reference_qmodel

import pyzeroq as zq
from pyzeroq.integer import IntegerModel, load_integer
from pyzeroq.integer import steps as S
from pyzeroq.integer.convert import FORMAT, FORMAT_VERSION
from pyzeroq.modules import set_weight_bits

MIXED_BITS = (2, 4, 2, 4, 3, 8)


def mixed_precision_qmodel():
    """ToyNet with 2-, 3-, 4- and 8-bit weights and 4-bit activations."""
    torch.manual_seed(3)
    q = quantize(ToyNet(), act_bits=4)
    set_weight_bits(q.graph_module, dict(zip(q.report.layers, MIXED_BITS)))
    return q


@pytest.fixture(scope="module", params=["resnet20", "mobilenetv2", "mixed"])
def int_model(request):
    q = mixed_precision_qmodel() if request.param == "mixed" else reference_qmodel(request.param)
    return zq.to_integer(q)


@pytest.fixture(scope="module")
def inputs():
    pixels, _ = zq.data.load_fashion_mnist("embedded")
    pixels = pixels[:16, None]
    return [pixels, pixels.astype(np.float32) / np.float32(255), torch.from_numpy(pixels).float() / 255]


def assert_identical(a: IntegerModel, b: IntegerModel, inputs) -> None:
    """Same steps, and the same logits and codes in every value slot (dtype included)."""
    assert b.steps == a.steps and b.output == a.output
    assert (b.rounding, b.acc_bits, b.overflow, b.folded_bn, b.bit_widths) == \
        (a.rounding, a.acc_bits, a.overflow, a.folded_bn, a.bit_widths)
    np.testing.assert_array_equal(b.input_lut, a.input_lut)
    for x in inputs:
        ea, eb = a.run(x), b.run(x)
        assert ea.keys() == eb.keys()
        for slot in ea:
            assert ea[slot].dtype == eb[slot].dtype, slot
            np.testing.assert_array_equal(eb[slot], ea[slot], err_msg=slot)
    assert [r["bound_bits"] for r in b.report().layers] == [r["bound_bits"] for r in a.report().layers]


def test_save_load_bit_exact(int_model, inputs, tmp_path):
    path = tmp_path / "int.pt"
    int_model.save(path)
    blob = torch.load(path, weights_only=True)  # plain data and tensors only
    assert blob["format"] == FORMAT and blob["version"] == FORMAT_VERSION
    assert len(blob["steps"]) == len(int_model.steps)
    loaded = load_integer(path)
    assert_identical(int_model, loaded, inputs)
    assert_identical(int_model, IntegerModel.load(str(path)), inputs[:1])
    for step in loaded.steps:  # canonical dtypes: the kernels check dtype identity
        if isinstance(step, S.LAYER_STEPS):
            assert step.layer.weight_codes.dtype is np.dtype(np.uint8)


def test_save_load_keeps_the_register_model(tmp_path):
    q = mixed_precision_qmodel()
    im = zq.to_integer(q, rounding="dyadic", acc_bits=14, overflow="saturate")
    im.save(tmp_path / "m.pt")
    loaded = load_integer(tmp_path / "m.pt")
    assert (loaded.rounding, loaded.acc_bits, loaded.overflow) == ("dyadic", 14, "saturate")
    assert_identical(im, loaded, [images(8)])
    bits = {s.name: s.layer.weight.bits for s in loaded.steps if isinstance(s, S.LAYER_STEPS)}
    assert sorted(bits.values()) == sorted(MIXED_BITS)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_copies_work_on_first_call(how):
    torch.manual_seed(0)
    im = zq.to_integer(quantize(ToyNet()))
    x = images(8)
    im.trace = True
    want = im(x)
    im.trace = False
    other = pickle.loads(pickle.dumps(im)) if how == "pickle" else copy.deepcopy(im)
    np.testing.assert_array_equal(other(x).numpy(), want.numpy())  # no "w must have dtype uint8, got uint8"
    assert_identical(im, other, [x, (x.numpy() * 255).round().astype(np.uint8)])
    assert other.trace is False and other.trace_log == []  # runtime state is not part of the copy


def test_load_errors(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*not a pyzeroq integer model"):
        load_integer(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="text.pt.*not a pyzeroq integer model"):
        load_integer(tmp_path / "text.pt")
    torch.manual_seed(0)
    im = zq.to_integer(quantize(ToyNet()))
    state = im.to_state()
    torch.save({**state, "version": FORMAT_VERSION + 1}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match=r"future.pt.*version 2 is not supported"):
        load_integer(tmp_path / "future.pt")
    torch.save({**state, "steps": state["steps"][1:]}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="broken.pt.*invalid integer model.*InputStep"):
        load_integer(tmp_path / "broken.pt")
    with pytest.raises(FileNotFoundError):
        load_integer(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="CPU"):
        load_integer(tmp_path / "other.pt", device="cuda")


def test_loaded_model_exports_the_same_onnx(tmp_path):
    pytest.importorskip("onnx")
    from pyzeroq.export import build_onnx

    torch.manual_seed(1)
    im = zq.to_integer(quantize(ToyNet(maxpool=True)))
    im.save(tmp_path / "m.pt")
    x = images(2).numpy()
    a = build_onnx(im, x, intermediate=True).SerializeToString()
    assert build_onnx(load_integer(tmp_path / "m.pt"), x, intermediate=True).SerializeToString() == a
