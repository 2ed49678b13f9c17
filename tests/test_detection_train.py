"""Detector training: seeded, and the multi-phase recipe chains its checkpoints."""

import torch

from pyzeroq.detection import train as train_mod

TINY_RECIPE = (
    {"steps": 4, "stop_after": 2, "lr": 1e-3, "warmup": 1, "seed": 0, "eval_every": 2},
    {"steps": 2, "stop_after": None, "lr": 5e-4, "warmup": 1, "seed": 1, "eval_every": 2},
)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_recipe_chains_phases_and_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "EVAL_IMAGES", 4)
    out_a, out_b = tmp_path / "a.pt", tmp_path / "b.pt"
    summary = train_mod.run_recipe(out_a, 2, 1e-4, None, "cpu", TINY_RECIPE)
    assert [p["steps"] for p in summary["phases"]] == [2, 2]
    assert summary["phases"][1]["init"] == str(out_a)
    train_mod.run_recipe(out_b, 2, 1e-4, None, "cpu", TINY_RECIPE)
    a, b = _weights(out_a), _weights(out_b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # phase 2 really started from phase 1: a single phase-2-like run from scratch differs
    out_c = tmp_path / "c.pt"
    train_mod.train(2, 2, 5e-4, 1e-4, 1, out_c, None, 2, "cpu", None, None, 1)
    c = _weights(out_c)
    assert any(not torch.equal(a[k], c[k]) for k in a)
