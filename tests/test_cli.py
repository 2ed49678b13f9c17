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
