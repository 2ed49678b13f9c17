import re

import pytest

from pyzeroq import cli, models


def test_parser_knows_the_subcommands():
    parser = cli.build_parser()
    args = parser.parse_args(["quantize", "--model", "resnet20", "--mixed", "2,4,8", "--avg-weight-bits", "4"])
    assert args.mixed == (2, 4, 8) and args.avg_weight_bits == 4.0
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "--mixed", "2,four"])
    assert parser.parse_args(["quantize", "--act-range", "mse"]).act_range == "mse"
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "--act-range", "kl"])


def test_mse_with_percentile_is_a_clean_error(capsys):
    if "resnet20" not in models.registry():
        pytest.skip("no committed resnet20 checkpoint")
    code = cli.main(["quantize", "--model", "resnet20", "--act-range", "mse", "--percentile", "99.9", "--eval", "none"])
    assert code == 2
    assert "act_range" in capsys.readouterr().err


def test_bad_config_is_a_clean_error(capsys):
    if "resnet20" not in models.registry():
        pytest.skip("no committed resnet20 checkpoint")
    code = cli.main(["quantize", "--model", "resnet20", "--weight-bits", "1", "--eval", "none"])
    assert code == 2
    assert "weight_bits" in capsys.readouterr().err


def test_eval_prints_the_table(capsys):
    if "resnet20" not in models.registry():
        pytest.skip("no committed resnet20 checkpoint")
    assert cli.main(["eval", "--model", "resnet20", "--split", "embedded"]) == 0
    out = capsys.readouterr().out
    expected = models.registry()["resnet20"]["embedded_top1"] * 100
    assert f"{expected:.2f} %" in out and "Ankle boot" in out


def test_low_bit_options_reach_the_config(monkeypatch, capsys):
    import pyzeroq
    seen = {}

    def fake_quantize(model, config, input_shape=None):
        seen["config"] = config
        raise ValueError("stop before the work")

    monkeypatch.setattr(pyzeroq, "quantize", fake_quantize)
    monkeypatch.setattr(models, "load_pretrained", lambda name: None)
    code = cli.main(["quantize", "--weight-bits", "3", "--act-bits", "4", "--act-range", "mse", "--weight-range", "mse",
                     "--first-last-bits", "8", "--distill-relax", "0.5", "--distill-augment",
                     "--reconstruction-iters", "200", "--guard-samples", "0", "--distill-method", "genie", "--seed", "3",
                     "--eval", "none"])
    assert code == 2 and "stop before the work" in capsys.readouterr().err
    c = seen["config"]
    assert (c.weight_range, c.first_last_bits, c.distill_relax, c.distill_augment) == ("mse", 8, 0.5, True)
    assert c.reconstruction.iters == 200 and c.reconstruction.seed == 3 and not c.sensitivity_act_quant
    assert c.reconstruction.guard_samples == 0
    assert c.distill_method == "genie"
    assert c.mp_eval_samples == pyzeroq.QuantConfig.mp_eval_samples
    cli.main(["quantize", "--mixed", "2,4,8", "--avg-weight-bits", "3", "--act-bits", "4",
              "--sensitivity-act-quant", "--mp-eval-samples", "8", "--eval", "none"])
    assert seen["config"].sensitivity_act_quant and seen["config"].reconstruction is None
    assert seen["config"].mp_eval_samples == 8


def test_bad_low_bit_option_is_a_clean_error(capsys):
    assert cli.main(["quantize", "--reconstruction-iters", "-5", "--eval", "none"]) == 2
    assert "reconstruction.iters" in capsys.readouterr().err
    assert cli.main(["quantize", "--distill-relax", "-1", "--eval", "none"]) == 2
    assert "distill_relax" in capsys.readouterr().err
    assert cli.main(["quantize", "--mixed", "2,4,8", "--avg-weight-bits", "4", "--mp-eval-samples", "0",
                     "--eval", "none"]) == 2
    assert "mp_eval_samples" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--sensitivity-act-quant"], "--sensitivity-act-quant set.* needs --mixed"),
    (["--mp-method", "random", "--no-relaxation"], "--mp-method, --no-relaxation set.* needs --mixed"),
    (["--mp-eval-samples", "4"], "--mp-eval-samples set.* needs --mixed"),
    (["--calibration", "gaussian", "--distill-method", "genie"], "--distill-method set.* needs --calibration distilled"),
    (["--calibration", "gaussian", "--distill-relax", "0.5", "--distill-augment"],
     "--distill-relax, --distill-augment set.* needs --calibration distilled"),
    (["--calibration", "gaussian", "--distill-iters", "5"], "--distill-iters set.* needs --calibration distilled"),
    (["--act-bits", "0", "--act-range", "mse", "--percentile", "99"], "--act-range, --percentile set.* --act-bits 0"),
    (["--mixed", "4", "--avg-weight-bits", "4"], "--mixed needs at least two different bit widths"),
    (["--guard-samples", "0"], "--guard-samples sets the reconstruction guard"),
])
def test_flags_without_effect_are_errors(capsys, monkeypatch, argv, match):
    monkeypatch.setattr("pyzeroq.quantize", lambda *a, **k: pytest.fail("quantize ran"))
    assert cli.main(["quantize", *argv, "--eval", "none"]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_missing_dataset_is_named_before_any_work(capsys, monkeypatch):
    """Without the Fashion-MNIST package, --eval test and the detection flags that need it fail at once
    (they failed after the whole quantization / synthesis and QAT)."""
    from pyzeroq import pipeline
    from pyzeroq.detection import api as det_api

    monkeypatch.setattr(cli, "fashion_mnist_available", lambda: False)
    monkeypatch.setattr("pyzeroq.data.fashion_mnist_available", lambda root=None: False)
    monkeypatch.setattr(pipeline, "calibration_data", lambda *a, **k: pytest.fail("quantization ran"))
    monkeypatch.setattr(det_api, "calibration_set", lambda *a, **k: pytest.fail("the calibration set was made"))
    assert cli.main(["quantize", "--model", "resnet20", "--eval", "test"]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    for extra in (["--eval-images", "4"], ["--calibration", "real"]):
        assert cli.main(["detect-quantize", "--out", "unused.pt", *extra]) == 2
        assert "dataset-fashion-mnist" in capsys.readouterr().err
    assert cli.main(["detect-quantize", "--out", "unused.pt", "--eval-images", str(10**6 + 1)]) == 2
    assert "--eval-images must be in [0, 1000000]" in capsys.readouterr().err
