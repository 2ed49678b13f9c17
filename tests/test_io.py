"""Save / load of quantized models (pyzeroq.io): safe format, exact round trips, dispatch."""

import pickletools
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toy_models import TinyNet

import pyzeroq as zq
from pyzeroq import io as pio
from pyzeroq.models import load_pretrained
from pyzeroq.modules import activation_records, layer_records, quant_layers

W8A8 = dict(weight_bits=8, act_bits=8, calibration="gaussian", num_samples=8, progress=False)
MP = dict(weight_bits=(4, 8), avg_weight_bits=6, act_bits=8, calibration="gaussian", num_samples=2,
          mp_relaxation=False, progress=False)
SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def resnet_w8a8():
    return zq.quantize(load_pretrained("resnet20"), zq.QuantConfig(**W8A8), input_shape=SHAPE)


@pytest.fixture(scope="module")
def resnet_mp():
    return zq.quantize(load_pretrained("resnet20"), zq.QuantConfig(**MP), input_shape=SHAPE)


@pytest.fixture(scope="module")
def mobilenet_mp():
    return zq.quantize(load_pretrained("mobilenetv2"), zq.QuantConfig(**MP), input_shape=SHAPE)


def _tiny():
    torch.manual_seed(0)
    return TinyNet().eval()


def _inputs(n=8, shape=SHAPE, seed=1):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def _round_trip(qmodel, tmp_path, name="model.pzq"):
    path = pio.save(qmodel, tmp_path / name)
    return path, zq.load(path)


def _records(q):
    """{layer: LayerQuant, or the error text of a layer without integer form (float input)}."""
    out = {}
    for name, layer in quant_layers(q.graph_module).items():
        try:
            out[name] = layer.layer_record(name)
        except ValueError as exc:
            out[name] = str(exc)
    return out


def _assert_same(q, loaded, x):
    with torch.no_grad():
        assert torch.equal(q(x), loaded(x))
    assert loaded.bit_widths == q.bit_widths and loaded.act_bits == q.act_bits
    assert loaded.config == q.config and loaded.report == q.report
    assert loaded.selection == q.selection
    assert _records(loaded) == _records(q)
    assert activation_records(loaded.graph_module) == activation_records(q.graph_module)
    assert list(loaded.state_dict()) == list(q.state_dict())
    assert [n for n, _ in loaded.named_modules()] == [n for n, _ in q.named_modules()]
    assert loaded.graph_module.code == q.graph_module.code
    assert loaded.training == q.training


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("fixture", ["resnet_w8a8", "resnet_mp", "mobilenet_mp"])
def test_round_trip_bit_exact(fixture, request, tmp_path):
    q = request.getfixturevalue(fixture)
    path, loaded = _round_trip(q, tmp_path)
    _assert_same(q, loaded, _inputs())
    assert layer_records(loaded.graph_module) == layer_records(q.graph_module)
    if q.config.mixed_precision:
        assert len(set(loaded.bit_widths.values())) == 2  # really mixed


def test_round_trip_pretrained_images_and_integer(resnet_mp, tmp_path):
    _, loaded = _round_trip(resnet_mp, tmp_path)
    images = torch.from_numpy(zq.data.load_fashion_mnist("embedded")[0][:16].astype(np.float32) / 255).unsqueeze(1)
    _assert_same(resnet_mp, loaded, images)
    a, b = zq.to_integer(resnet_mp), zq.to_integer(loaded)
    assert torch.equal(torch.as_tensor(a(images)), torch.as_tensor(b(images)))


def test_file_loads_with_weights_only(resnet_w8a8, tmp_path):
    path = pio.save(resnet_w8a8, tmp_path / "m.pzq")
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == pio.FORMAT and blob["version"] == pio.VERSION
    assert blob["pyzeroq_version"] == zq.__version__
    assert blob["bit_widths"] == resnet_w8a8.bit_widths
    assert blob["config"]["weight_bits"] == 8 and "calibration_data" not in blob["config"]
    # the pickle references only torch's tensor rebuild functions and OrderedDict: no pyzeroq / fx classes
    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    used = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert not any(op.name in ("STACK_GLOBAL", "INST", "OBJ") for op, _, _ in pickletools.genops(data))
    assert used and all(g in ("collections OrderedDict", "torch._utils _rebuild_tensor_v2")
                        or (g.startswith("torch ") and g.endswith("Storage")) for g in used), used


def test_method_save_and_load(resnet_w8a8, tmp_path):
    resnet_w8a8.save(tmp_path / "m.pzq")
    loaded = zq.load(tmp_path / "m.pzq")
    _assert_same(resnet_w8a8, loaded, _inputs())


def test_learned_steps_and_training_flag(tmp_path):
    q = zq.quantize(_tiny(), zq.QuantConfig(**W8A8), input_shape=(1, 16, 16))
    layer = q.graph_module.get_submodule("c1.0")
    layer.weight_quant.learn_step()
    q.graph_module.act_quant_0.learn_step()
    q.train()
    _, loaded = _round_trip(q, tmp_path)
    x = _inputs(shape=(1, 16, 16))
    _assert_same(q, loaded, x)
    loaded_layer = loaded.graph_module.get_submodule("c1.0")
    scale = loaded_layer.weight_quant.scale
    assert isinstance(scale, nn.Parameter) and scale.requires_grad
    assert loaded_layer.weight_quant.learned and loaded_layer.training


class _UserNorm(nn.Module):
    """A user's normalizer (not pyzeroq's class): saved as pyzeroq.models.Normalize."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.3]).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor([0.4]).view(1, 1, 1, 1))

    def forward(self, x):
        return x.sub(self.mean).div(self.std)


class _Zoo(nn.Module):
    """Float ops left by the surgery: SiLU, a BN after a ReLU, cat, slices, view / size, getattr."""

    def __init__(self):
        super().__init__()
        self.norm = _UserNorm()
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.act = nn.SiLU()
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        x = self.c1(self.norm(x))
        x = self.bn(F.relu(x))
        x = torch.cat([self.act(x), x[:, :3] * 2, x[:, 3:]], dim=1)
        x = self.drop(self.pool(x))
        return self.fc(x.view(x.size(0), -1)) + x.shape[1] * 0.0


def test_zoo_model_with_float_ops(tmp_path):
    torch.manual_seed(0)
    model = _Zoo().eval()
    q = zq.quantize(model, zq.QuantConfig(**W8A8, float_ops="allow"), input_shape=(1, 8, 8))
    assert q.report.float_ops
    _, loaded = _round_trip(q, tmp_path)
    _assert_same(q, loaded, _inputs(shape=(1, 8, 8)))
    assert type(loaded.graph_module.norm).__name__ == "Normalize"


class _Shared(nn.Module):
    """One ReLU module under two names."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)
        self.r1 = self.r2 = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.r2(self.c2(self.r1(self.c1(x))))
        return self.fc(x.mean((2, 3)))


def test_shared_module_stays_shared(tmp_path):
    q = zq.quantize(_Shared().eval(), zq.QuantConfig(**W8A8), input_shape=(1, 8, 8))
    q.graph_module.add_module("alias", q.graph_module.r1)  # fx itself keeps one name per module
    _, loaded = _round_trip(q, tmp_path)
    _assert_same(q, loaded, _inputs(shape=(1, 8, 8)))
    assert loaded.graph_module.alias is loaded.graph_module.r1


def test_normalizer_other_formula_refused(tmp_path):
    q = zq.quantize(_Zoo().eval(), zq.QuantConfig(**W8A8, float_ops="allow"), input_shape=(1, 8, 8))
    q.graph_module.norm.forward = lambda x: x * 2
    with pytest.raises(ValueError, match="'norm'.*exactly \\(x - mean\\) / std"):
        pio.save(q, tmp_path / "m.pzq")


def test_unsupported_module_refused_on_save(tmp_path):
    q = zq.quantize(_tiny(), zq.QuantConfig(**W8A8), input_shape=(1, 16, 16))
    q.graph_module.pool = _Custom()
    with pytest.raises(ValueError, match="module 'pool' is a .*_Custom"):
        pio.save(q, tmp_path / "m.pzq")


class _Custom(nn.AdaptiveAvgPool2d):
    def __init__(self):
        super().__init__(1)


# ---------------------------------------------------------------- refusing tampered files
def _tampered(q, tmp_path, edit):
    path = pio.save(q, tmp_path / "orig.pzq")
    blob = torch.load(path, weights_only=True)
    edit(blob)
    bad = tmp_path / "bad.pzq"
    torch.save(blob, bad)
    return bad


def _node(blob, name):
    return next(n for n in blob["graph"]["nodes"] if n["name"] == name)


def _module(blob, name):
    return next(m for m in blob["graph"]["modules"] if m["name"] == name)


@pytest.mark.parametrize("edit, message", [
    (lambda b: _module(b, "blocks.0.relu1").update({"class": "os.system"}), "class 'os.system' is not allowed"),
    (lambda b: _module(b, "blocks.0.relu1").update({"class": "torch.nn.functional.relu"}), "is not allowed"),
    (lambda b: _module(b, "blocks.0.relu1").update({"class": "torch.nn.parallel.DistributedDataParallel"}),
     "is not allowed"),
    (lambda b: _node(b, "add").update({"target": "builtins.eval"}), "function 'builtins.eval' is not allowed"),
    (lambda b: _node(b, "add").update({"target": "os.system"}), "function 'os.system' is not allowed"),
    (lambda b: _node(b, "add").update({"target": "torch.load"}), "function 'torch.load' is not allowed"),
    (lambda b: _node(b, "add").update({"target": "operator.methodcaller"}), "is not allowed"),
    (lambda b: _node(b, "add").update({"target": "torch.import_ir_module"}), "is not allowed"),
    (lambda b: _node(b, "add").update({"target": "torch.from_file"}), "is not allowed"),
    (lambda b: _node(b, "add").update({"target": "torch.compile"}), "is not allowed"),
    (lambda b: _node(b, "add").update({"target": "torch.set_num_threads"}), "is not allowed"),
    (lambda b: _node(b, "add").update({"target": "torch.nn.functional.handle_torch_function"}), "is not allowed"),
    (lambda b: _node(b, "add").update({"target": "torch.serialization.load"}), "is not allowed"),
    (lambda b: _node(b, "add").update({"op": "call_method", "target": "__call__"}), "method '__call__' is not allowed"),
    (lambda b: _node(b, "add").update({"op": "call_method", "target": "numpy"}), "method 'numpy' is not allowed"),
    (lambda b: _node(b, "add").update({"op": "get_attr", "target": "forward.__globals__"}), "target"),
    (lambda b: _node(b, "x").update({"target": "x=__import__('os').system('true')"}), "not an identifier"),
    (lambda b: _node(b, "add").update({"kwargs": {"dict": [["a=1)#", 1]]}}), "identifier keys"),
    (lambda b: _node(b, "add").update({"args": {"tuple": [{"node": "later"}, 1]}}), "unexpected value"),
    (lambda b: _module(b, "blocks.0.relu1").update({"attrs": {"training": False, "_forward_hooks": {}}}),
     "attribute name '_forward_hooks' is not allowed"),
    (lambda b: b["graph"]["modules"].append({"name": 'x"); evil("', "class": "torch.nn.ReLU"}), "malformed"),
    (lambda b: b.update({"format": "something.else"}), "unknown file format 'something.else'"),
    (lambda b: b.update({"version": 99}), "version 99"),
    (lambda b: b["state_dict"].pop(next(iter(b["state_dict"]))), "state dict does not fit"),
    (lambda b: _module(b, "stem.0").update({"params": [["weight", {"shape": [1], "dtype": "os.system"}]]}),
     "'os.system' is not a torch dtype"),
])
def test_tampered_file_refused(resnet_w8a8, tmp_path, edit, message):
    bad = _tampered(resnet_w8a8, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        zq.load(bad)


def test_getattr_only_of_tensor_attributes(resnet_w8a8, tmp_path):
    def edit(blob):
        _node(blob, "add").update({"target": "builtins.getattr", "args": {"tuple": [{"node": "x"}, "__class__"]}})
    with pytest.raises(ValueError, match="getattr only reads"):
        zq.load(_tampered(resnet_w8a8, tmp_path, edit))


def test_pickled_model_refused(resnet_w8a8, tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"format": pio.FORMAT, "model": nn.Linear(2, 2)}, path)  # a pickled module: not safe to load
    with pytest.raises(ValueError, match=f"{path.name}.*weights_only=True.*{pio.FORMAT}"):
        zq.load(path)


def test_unknown_file_names_path_and_formats(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=f"{path.name}.*unknown file format None.*{pio.FORMAT}.*pyzeroq.detection/"):
        zq.load(path)
    (tmp_path / "text.txt").write_text("hello")
    with pytest.raises(ValueError, match="text.txt"):
        zq.load(tmp_path / "text.txt")


# ---------------------------------------------------------------- state dicts of other bit widths
def test_state_dict_of_other_bit_widths_names_the_layer(resnet_w8a8, resnet_mp):
    layer = next(n for n, b in resnet_mp.bit_widths.items() if b == 4)
    with pytest.raises(ValueError, match=f"layer '{layer}'.*4-bit weights.*8-bit weights"):
        pio.check_bit_widths(resnet_w8a8, resnet_mp.state_dict(), prefix="graph_module.")
    with pytest.raises(ValueError, match=f"layer '{layer}'.*4-bit weights.*8-bit weights"):
        resnet_w8a8.load_state_dict(resnet_mp.state_dict())
    resnet_w8a8.load_state_dict(resnet_w8a8.state_dict())  # same bits: loads


def test_state_dict_of_other_act_bits_names_the_quantizer(resnet_w8a8):
    q6 = zq.quantize(load_pretrained("resnet20"), zq.QuantConfig(**{**W8A8, "act_bits": 6}), input_shape=SHAPE)
    with pytest.raises(ValueError, match="activation quantizer 'act_quant_0'.*6-bit activations.*8-bit"):
        pio.check_bit_widths(resnet_w8a8, q6.state_dict(), prefix="graph_module.")


def test_loaded_file_of_other_bits_cannot_mix(resnet_w8a8, resnet_mp, tmp_path):
    path = pio.save(resnet_mp, tmp_path / "mp.pzq")
    state = torch.load(path, weights_only=True)["state_dict"]
    with pytest.raises(ValueError, match="layer '.*': the state dict has 4-bit weights"):
        pio.check_bit_widths(resnet_w8a8, state, prefix="graph_module.")


# ---------------------------------------------------------------- dispatch
def test_integer_model_dispatch(resnet_w8a8, tmp_path):
    int_model = zq.to_integer(resnet_w8a8)
    if not hasattr(int_model, "save"):
        pytest.skip("IntegerModel.save not there yet")
    int_model.save(tmp_path / "int.pzq")
    loaded = zq.load(tmp_path / "int.pzq")  # format "pyzeroq.integer_model" -> load_integer
    assert type(loaded) is type(int_model)
    x = _inputs()
    assert torch.equal(torch.as_tensor(int_model(x)), torch.as_tensor(loaded(x)))
    assert loaded.bit_widths == resnet_w8a8.bit_widths


def test_qat_detector_dispatch_and_round_trip(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "results" / "detector_w4a8.pt"
    if not path.exists():
        pytest.skip("no committed quantized detector")
    pytest.importorskip("pyzeroq.detection")
    detector = zq.load(path)  # format "pyzeroq.detection/1" -> pyzeroq.detection.load_detector
    detector.save(tmp_path / "det.pt")
    again = zq.load(tmp_path / "det.pt")
    size = detector.config["input_size"]
    x = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = detector(x), again(x)
    assert all(torch.equal(u, v) for key in a for u, v in zip(a[key], b[key]))
    assert {k: v for k, v in detector.state_dict().items() if isinstance(v, torch.Tensor)}.keys() == \
        {k for k, v in again.state_dict().items() if isinstance(v, torch.Tensor)}


def test_real_calibration_config_round_trips_without_data(tmp_path):
    data = torch.rand(8, 1, 16, 16)
    cfg = zq.QuantConfig(weight_bits=8, act_bits=8, calibration="real", calibration_data=data, num_samples=8,
                         progress=False)
    q = zq.quantize(_tiny(), cfg, input_shape=(1, 16, 16))
    path, loaded = _round_trip(q, tmp_path)
    assert loaded.config.calibration == "real" and loaded.config.calibration_data is None
    assert torch.load(path, weights_only=True)["calibration_data"] == {"shape": [8, 1, 16, 16], "dtype": "torch.float32"}
    _assert_same(q, loaded, data)



def test_reconstruction_config_round_trip(tmp_path):
    """A model quantized with block reconstruction loads back with its ReconstructionConfig (it was
    saved as a plain dict, which QuantConfig then refused) and the same outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 5))
    rc = zq.ReconstructionConfig(iters=3, batch_size=4, guard_samples=4)
    cfg = zq.QuantConfig(weight_bits=4, act_bits=8, num_samples=4, distill_iters=2, progress=False, reconstruction=rc)
    q = zq.quantize(model.eval(), cfg, input_shape=(3, 16, 16))
    q.save(tmp_path / "r.pzq")
    loaded = zq.load(tmp_path / "r.pzq")
    assert loaded.config.reconstruction == rc
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded(x), q(x))


def test_reconstruction_blocks_and_unknown_fields_on_load():
    config, notes = pio._config({"weight_bits": 4, "reconstruction": {"iters": 7, "blocks": [["a", "b"], ["c"]],
                                                                      "from_the_future": 1}})
    assert config.reconstruction == zq.ReconstructionConfig(iters=7, blocks=(("a", "b"), ("c",)))
    assert any("from_the_future" in n for n in notes)


@pytest.mark.filterwarnings("ignore::pyzeroq.pipeline.FloatOpsWarning")
@pytest.mark.parametrize("rnn", ["LSTM", "GRU"])
def test_round_trip_with_a_float_rnn(rnn, tmp_path):
    """An RNN kept in float (float_ops="warn") is saved and rebuilt: its weight list is rebuilt on load
    from the loaded weights (torch's own _init_flat_weights); the same outputs bit for bit."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 8, 3, padding=1)
            self.rnn = getattr(nn, rnn)(8, 8, batch_first=True)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            y, _ = self.rnn(torch.relu(self.c(x)).flatten(2).transpose(1, 2))
            return self.fc(y[:, -1])

    torch.manual_seed(0)
    q = zq.quantize(Net().eval(), zq.QuantConfig(calibration="gaussian", num_samples=4, float_ops="warn",
                                                 progress=False), input_shape=(1, 6, 6))
    back = zq.load(q.save(tmp_path / "rnn.pzq"))
    x = torch.rand(3, 1, 6, 6)
    assert torch.equal(back(x), q(x))
    assert all(a is b for a, b in zip(back.graph_module.rnn._flat_weights, back.graph_module.rnn.parameters()))


def test_old_configs_with_options_that_did_nothing_still_load():
    """Files written before QuantConfig refused ineffective combinations (e.g. distill_method='genie' with
    Gaussian calibration) load, the options reset with a note; other bad fields still raise."""
    config, notes = pio._config({"weight_bits": 4, "calibration": "gaussian", "distill_method": "genie",
                                 "distill_relax": 0.5})
    assert (config.distill_method, config.distill_relax) == ("zeroq", 0.0)
    assert any("reset on load" in n and "genie" in n for n in notes)
    with pytest.raises(ValueError, match="weight_bits"):
        pio._config({"weight_bits": 1, "calibration": "gaussian", "distill_method": "genie"})


def test_malformed_bit_widths_and_mismatched_codes_name_the_file(tmp_path):
    q = zq.quantize(TinyNet().eval(), zq.QuantConfig(calibration="gaussian", num_samples=4, progress=False),
                    input_shape=(1, 16, 16))
    blob = torch.load(q.save(tmp_path / "q.pzq"), weights_only=True)
    torch.save({**blob, "bit_widths": None}, tmp_path / "none.pzq")
    with pytest.raises(ValueError, match=r"none.pzq: malformed bit_widths"):
        zq.load(tmp_path / "none.pzq")
    layer = next(iter(blob["bit_widths"]))
    torch.save({**blob, "bit_widths": {**blob["bit_widths"], layer: 4}}, tmp_path / "bits.pzq")
    with pytest.raises(ValueError, match=r"bits.pzq: .*"):
        zq.load(tmp_path / "bits.pzq")
