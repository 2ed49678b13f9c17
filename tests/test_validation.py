"""quantize checks its arguments before any expensive stage (no distillation, calibration or
sensitivity pass runs), names the offending argument, and never modifies the given model."""

import dataclasses
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from toy_models import TinyNet, trained_tiny

import pyzeroq as zq
from pyzeroq import pipeline

FAST = dict(num_samples=8, distill_iters=5, progress=False)
SHAPE = (1, 16, 16)


@pytest.fixture
def no_expensive_stage(monkeypatch):
    """Every expensive stage of the pipeline fails the test if it starts."""
    def fail(*args, **kwargs):
        raise AssertionError("an expensive stage ran before the arguments were validated")
    for name in ("distill_data", "gaussian_inputs", "calibration_data", "layer_sensitivities", "select_bits"):
        monkeypatch.setattr(pipeline, name, fail)


def _state(model: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.training,
            [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [p.dtype for p in model.parameters()])


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    state, training, module_flags, grads, dtypes = before
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert v.dtype == now[k].dtype and torch.equal(v, now[k]), k
    assert model.training == training and [m.training for m in model.modules()] == module_flags
    assert [p.requires_grad for p in model.parameters()] == grads
    assert [p.dtype for p in model.parameters()] == dtypes


def _rejects(model, config, error, match, input_shape=SHAPE):
    before = _state(model)
    with pytest.raises(error, match=match):
        zq.quantize(model, config, input_shape=input_shape)
    assert_unchanged(model, before)


class _Holder:
    """A plain object deep inside a model, holding something deepcopy cannot copy."""

    def __init__(self):
        self.lock = threading.Lock()


@pytest.mark.parametrize("where, path", [("module", "model.c2.lock"), ("nested", "model.c2.holder.lock")])
def test_model_that_cannot_be_deep_copied_names_the_attribute(no_expensive_stage, where, path):
    model = trained_tiny(steps=1)
    if where == "module":
        model.c2.lock = threading.Lock()
    else:
        model.c2.holder = _Holder()
    _rejects(model, zq.QuantConfig(**FAST), TypeError, rf"model cannot be deep-copied.*{path.replace('.', '[.]')} ")


class _DataDependent(TinyNet):
    def forward(self, x):
        if x.mean() > 0:  # control flow on a value: not symbolically traceable
            x = x * 1.0
        return super().forward(x)


def test_untraceable_model_fails_before_distillation(no_expensive_stage):
    model = _DataDependent().eval()
    _rejects(model, zq.QuantConfig(**FAST), ValueError, "model could not be traced by torch.fx")


def test_wrong_input_shape_reports_the_shape_and_the_model_error(no_expensive_stage):
    model = trained_tiny(steps=1).train()  # the training flag must survive too
    before = _state(model)
    with pytest.raises(ValueError) as info:
        zq.quantize(model, zq.QuantConfig(**FAST), input_shape=(3, 16, 16))
    message = str(info.value)
    assert "input_shape" in message and "(2, 3, 16, 16)" in message
    assert "expected input[2, 3, 16, 16] to have 1 channels" in message  # torch's own words
    assert_unchanged(model, before)


def test_real_calibration_data_that_does_not_fit_the_model(no_expensive_stage):
    data = torch.rand(4, 3, 16, 16)
    with pytest.raises(ValueError, match=r"calibration_data does not fit the model.*\(2, 3, 16, 16\).*channels"):
        zq.quantize(trained_tiny(steps=1), zq.QuantConfig(calibration="real", calibration_data=data, **FAST))


def test_bad_device_is_named(no_expensive_stage):
    _rejects(trained_tiny(steps=1), zq.QuantConfig(device="gpu0", **FAST), ValueError, "device")


@pytest.mark.parametrize("data, error, match", [
    ((torch.rand(4, 1, 16, 16), torch.zeros(4, dtype=torch.int64)), TypeError, "only the images"),
    ([torch.rand(1, 16, 16)] * 4, TypeError, "calibration_data must be one float tensor"),
    ("images.npy", TypeError, "calibration_data must be one float tensor"),
    (torch.zeros(4, 1, 16, 16, dtype=torch.uint8), ValueError, "calibration_data must hold floats"),
    (np.zeros((4, 1, 16, 16), dtype=np.uint8), ValueError, "calibration_data must hold floats"),
    (torch.rand(16), ValueError, "calibration_data must be \\[N, ...\\]"),
    (torch.rand(0, 1, 16, 16), ValueError, "calibration_data is empty"),
    (torch.full((4, 1, 16, 16), float("nan")), ValueError, "calibration_data contains NaN"),
])
def test_bad_calibration_data(no_expensive_stage, data, error, match):
    _rejects(trained_tiny(steps=1), zq.QuantConfig(calibration="real", calibration_data=data, **FAST),
             error, match, input_shape=None)


def test_calibration_data_must_match_input_shape(no_expensive_stage):
    cfg = zq.QuantConfig(calibration="real", calibration_data=torch.rand(4, 1, 16, 16), **FAST)
    _rejects(trained_tiny(steps=1), cfg, ValueError, r"calibration_data samples have shape \(1, 16, 16\) "
             r"but input_shape is \(1, 28, 28\)", input_shape=(1, 28, 28))


def test_numpy_calibration_data_is_the_same_as_a_tensor():
    model = trained_tiny(steps=1)
    data = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    a, b = (zq.quantize(model, zq.QuantConfig(calibration="real", calibration_data=d, weight_bits=4, **FAST))
            for d in (data, data.numpy().astype(np.float64)))
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(a(x), b(x))


class _IntParameter(TinyNet):
    def __init__(self):
        super().__init__()
        self.steps = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)


def test_non_float_parameters_are_a_clear_error(no_expensive_stage):
    _rejects(_IntParameter().eval(), zq.QuantConfig(**FAST), TypeError, r"floating point.*steps \(torch.int64\)")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_float_dtypes_are_quantized_as_a_float32_copy(dtype):
    model32 = trained_tiny(steps=5)
    model = trained_tiny(steps=5).to(dtype)
    before = _state(model)
    cfg = zq.QuantConfig(weight_bits=4, calibration="gaussian", **FAST)
    q = zq.quantize(model, cfg, input_shape=SHAPE)
    assert_unchanged(model, before)
    assert any(str(dtype) in note and "float32 copy" in note for note in q.report.notes)
    assert all(p.dtype == torch.float32 for p in q.parameters())
    if dtype == torch.float64:  # float32 -> float64 -> float32 is exact: the same model as from float32
        reference = zq.quantize(model32, cfg, input_shape=SHAPE)
        assert not reference.report.notes
        x = torch.rand(4, *SHAPE)
        assert torch.equal(q(x), reference(x))


def test_a_successful_run_leaves_a_training_model_as_it_was():
    model = trained_tiny(steps=5).train()
    before = _state(model)
    zq.quantize(model, zq.QuantConfig(weight_bits=(2, 4, 8), avg_weight_bits=4, **FAST), input_shape=SHAPE)
    assert_unchanged(model, before)


# ---------------------------------------------------------------- found by a new user's trial
def test_input_shape_without_channel_dimension_is_caught_by_the_dry_run(no_expensive_stage):
    """A batch of one [1, 16, 16] passes conv layers as an unbatched image; the dry run uses two."""
    with pytest.raises(ValueError, match=r"input_shape=\(16, 16\) does not fit the model"):
        zq.quantize(trained_tiny(steps=0), zq.QuantConfig(**FAST), input_shape=(16, 16))


def test_pixel_values_as_floats_are_refused(no_expensive_stage):
    data = torch.rand(8, 1, 16, 16) * 255
    with pytest.raises(ValueError, match=r"calibration_data must be float images in \[0, 1\].*divide uint8"):
        zq.quantize(trained_tiny(steps=0), zq.QuantConfig(calibration="real", calibration_data=data, **FAST))


class _ViewNet(nn.Module):
    """conv -> ReLU -> pool -> x.view(x.size(0), -1) -> linear, without input normalization."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu, self.pool = nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.pool(self.relu(self.conv(x)))
        return self.fc(y.view(y.size(0), -1))


def test_view_with_size_keeps_the_linear_input_quantized_and_missing_normalization_is_noted():
    qmodel = zq.quantize(_ViewNet().eval(), zq.QuantConfig(calibration="gaussian", **FAST), input_shape=(1, 8, 8))
    assert qmodel.report.float_ops == []
    assert qmodel.graph_module.fc.input_quant is not None  # the int32 bias and the integer form need it
    x = torch.rand(4, 1, 8, 8)
    np.testing.assert_allclose(zq.to_integer(qmodel)(x).numpy(), qmodel(x).detach().numpy(), atol=1e-2)
    assert any("no input normalization module" in n for n in qmodel.report.notes)


def test_float_ops_warn_and_layers_reading_them_are_listed():
    class SinNet(_ViewNet):
        def forward(self, x):
            y = self.pool(torch.sin(self.conv(x)))  # sin has no quantized form
            return self.fc(torch.flatten(y, 1))

    with pytest.raises(ValueError, match=r"float_ops.*\n?|sin") as info:  # default float_ops="error"
        zq.quantize(SinNet().eval(), zq.QuantConfig(calibration="gaussian", **FAST), input_shape=(1, 8, 8))
    assert "sin" in str(info.value) and "Supported operators" in str(info.value)
    assert "float_ops='warn'" in str(info.value)
    with pytest.warns(pipeline.FloatOpsWarning, match="no integer-only form"):
        qmodel = zq.quantize(SinNet().eval(), zq.QuantConfig(calibration="gaussian", float_ops="warn", **FAST),
                             input_shape=(1, 8, 8))
    assert any("sin" in op for op in qmodel.report.float_ops)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "allow": listed, no warning
        qmodel = zq.quantize(SinNet().eval(), zq.QuantConfig(calibration="gaussian", float_ops="allow", **FAST),
                             input_shape=(1, 8, 8))
    assert any("sin" in op for op in qmodel.report.float_ops)


def test_float_ops_mode_is_validated():
    with pytest.raises(ValueError, match="float_ops must be one of"):
        zq.QuantConfig(float_ops="ignore")


def test_models_pyzeroq_cannot_take_are_named_first(no_expensive_stage):
    """Clear errors before any stage for models that used to fail deep inside torch or with a misleading message."""
    cfg = zq.QuantConfig(calibration="gaussian", **FAST)
    no_stats = _ViewNet()
    no_stats.bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="BatchNorm 'bn' keeps no running statistics"):
        zq.quantize(no_stats.eval(), cfg, input_shape=(1, 8, 8))
    negative = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3)).eval()
    negative[1].running_var[0] = -1.0
    with pytest.raises(ValueError, match="BatchNorm '1' has a negative running_var"):
        zq.quantize(negative, cfg, input_shape=(1, 8, 8))
    lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match="uninitialized lazy parameters"):
        zq.quantize(lazy, cfg, input_shape=(1, 8, 8))
    with pytest.raises(TypeError, match="TorchScript module"):
        zq.quantize(torch.jit.script(nn.Sequential(nn.Conv2d(1, 4, 3))), cfg, input_shape=(1, 8, 8))


def test_a_quantized_model_is_not_quantized_again():
    q = zq.quantize(_ViewNet().eval(), zq.QuantConfig(calibration="gaussian", **FAST), input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="already quantized"):
        zq.quantize(q, zq.QuantConfig(calibration="gaussian", **FAST), input_shape=(1, 8, 8))


def test_search_inputs_checked_before_calibration(monkeypatch):
    """A selection made under another budget and a DP too large for pareto_bins are refused right after
    the graph surgery (they were found after distillation and the sensitivities)."""
    mp = dict(weight_bits=(2, 4, 8), calibration="gaussian", mp_relaxation=False, **FAST)
    model = _ViewNet().eval()
    sel = zq.quantize(model, zq.QuantConfig(avg_weight_bits=4, **mp), input_shape=(1, 8, 8)).selection
    for name in ("distill_data", "gaussian_inputs", "calibration_data", "layer_sensitivities", "select_bits"):
        monkeypatch.setattr(pipeline, name, lambda *a, **k: pytest.fail("an expensive stage ran"))
    with pytest.raises(ValueError, match="selection was made under another cost budget"):
        zq.quantize(model, zq.QuantConfig(avg_weight_bits=3, **mp), input_shape=(1, 8, 8), selection=sel)
    with pytest.raises(ValueError, match="selection was made under another cost budget"):
        zq.quantize(model, zq.QuantConfig(avg_weight_bits=4, budget_metric="bops", **mp), input_shape=(1, 8, 8),
                    selection=sel)
    with pytest.raises(ValueError, match="pareto_bins=100000000: bins: the DP would need"):
        zq.quantize(model, zq.QuantConfig(avg_weight_bits=4, pareto_bins=10**8, **mp), input_shape=(1, 8, 8))
    n = len(sel.layers)
    for choice, match in (((2,) * n, "over the budget"), ((3,) * n, "one index into"), ((1,), "one index into")):
        with pytest.raises(ValueError, match=match):
            zq.quantize(model, zq.QuantConfig(avg_weight_bits=4, **mp), input_shape=(1, 8, 8),
                        selection=dataclasses.replace(sel, choice=choice))
