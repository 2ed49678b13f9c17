import pytest

from pyzeroq import QuantConfig


def test_defaults_are_w8a8_distilled():
    cfg = QuantConfig()
    assert cfg.weight_bits == 8 and cfg.act_bits == 8 and cfg.calibration == "distilled"
    assert (cfg.mp_keep_estimate, cfg.mp_group_size, cfg.mp_size_bins, cfg.mp_keep_exact) == (10, 5, 200, 5)


def test_mixed_precision_candidates_are_sorted():
    cfg = QuantConfig(weight_bits=[8, 2, 4], avg_weight_bits=4)
    assert cfg.weight_bits == (2, 4, 8) and cfg.mixed_precision


def test_frozen():
    with pytest.raises(Exception):
        QuantConfig().act_bits = 4


@pytest.mark.parametrize("kwargs, field", [
    (dict(weight_bits=1), "weight_bits"),
    (dict(weight_bits=17), "weight_bits"),
    (dict(weight_bits=True), "weight_bits"),
    (dict(weight_bits=(2, 2, 4), avg_weight_bits=3), "weight_bits"),
    (dict(weight_bits=()), "weight_bits"),
    (dict(act_bits=0), "act_bits"),
    (dict(weight_bits=(2, 4, 8)), "avg_weight_bits"),
    (dict(weight_bits=(2, 4, 8), avg_weight_bits=9), "avg_weight_bits"),
    (dict(weight_bits=(2, 4, 8), avg_weight_bits=1.5), "avg_weight_bits"),
    (dict(weight_bits=4, avg_weight_bits=3), "avg_weight_bits"),
    (dict(calibration="imagenet"), "calibration"),
    (dict(calibration="real"), "calibration_data"),
    (dict(num_samples=-1), "num_samples"),
    (dict(num_samples=0), "num_samples"),
    (dict(distill_iters=-5), "distill_iters"),
    (dict(distill_lr=0), "distill_lr"),
    (dict(distill_lr=float("inf")), "distill_lr"),  # distilled NaN images, then an unrelated late error
    (dict(distill_lr=float("nan")), "distill_lr"),
    (dict(distill_lr=True), "distill_lr"),
    (dict(mp_relaxation="no"), "mp_relaxation"),  # a truthy string: the grouped search would run
    (dict(mp_relaxation=None), "mp_relaxation"),
    (dict(mp_relaxation=1), "mp_relaxation"),
    (dict(percentile=30), "percentile"),
    (dict(act_range="entropy"), "act_range"),
    (dict(act_range="mse", percentile=99.9), "act_range"),
    (dict(mp_method="greedy"), "mp_method"),
    (dict(mp_group_size=0), "mp_group_size"),
    (dict(mp_size_bins=2.5), "mp_size_bins"),
    (dict(mp_eval_samples=0), "mp_eval_samples"),
    (dict(mp_eval_dtype="double"), "mp_eval_dtype"),
    (dict(budget_metric="flops"), "budget_metric"),
    (dict(seed=-1), "seed"),
    (dict(device=0), "device"),
    (dict(per_channel=1), "per_channel"),
    (dict(progress="no"), "progress"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(calibration="gaussian", distill_method="genie"), "distill_method shape distilled images"),
    (dict(calibration="gaussian", distill_relax=0.5, distill_augment=True), "distill_relax, distill_augment"),
    (dict(weight_bits=4, act_bits=8, sensitivity_act_quant=True), "sensitivity_act_quant=True shapes the mixed"),
])
def test_options_without_effect_are_refused(kwargs, match):
    """The Python API refuses what the CLI refuses: options this combination would ignore."""
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_distill_options_with_a_distilled_guard_are_used():
    from pyzeroq.config import ReconstructionConfig

    QuantConfig(calibration="gaussian", distill_method="genie",
                reconstruction=ReconstructionConfig(guard_data="distilled"))  # the guard's images are distilled
