import json

import pytest
import torch
import torch.fx as fx

from pyzeroq import evaluate, models
from pyzeroq.data import load_fashion_mnist


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_models_trace_with_fx_and_keep_outputs(name):
    model = models.build_model(name).eval()
    gm = fx.symbolic_trace(model)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert isinstance(next(iter(model.children())), models.Normalize)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_pretrained_reproduces_recorded_embedded_accuracy(name):
    entry = models.registry().get(name)
    if entry is None:
        pytest.skip(f"no committed checkpoint for {name}")
    model = models.load_pretrained(name)
    assert not model.training
    x, y = load_fashion_mnist("embedded")
    result = evaluate(model, x, y)
    assert result.top1 == entry["embedded_top1"]


def test_resnet20_structure():
    model = models.build_model("resnet20")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 19 + 2 and len(bns) == len(convs)  # 19 3x3 convs + 2 projection shortcuts


def test_mobilenetv2_has_depthwise_convs():
    model = models.build_model("mobilenetv2")
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(depthwise) >= 8


@pytest.mark.parametrize("name", ["resnet18", "", None])
def test_bad_model_name(name):
    with pytest.raises(ValueError, match="name"):
        models.load_pretrained(name)


def test_checksum_mismatch_raises(tmp_path, monkeypatch):
    ckpt = tmp_path / "m.pt"
    torch.save(models.build_model("resnet20").state_dict(), ckpt)
    registry = tmp_path / "checkpoints.json"
    registry.write_text(json.dumps({"resnet20": {"file": "m.pt", "sha256": "0" * 64}}))
    monkeypatch.setattr(models, "CHECKPOINT_DIR", tmp_path)
    monkeypatch.setattr(models, "REGISTRY_PATH", registry)
    with pytest.raises(models.ChecksumError):
        models.load_pretrained("resnet20")
