"""Data-parallel detection synthesis and QAT (pyzeroq.detection.distributed): two CPU
processes (gloo, torch.multiprocessing.spawn) against one process with the same global batch.

Tolerances: the synthesized set must be bitwise equal (whole batches are sharded, each runs the
one-process computation). QAT: the two-process gradient is the sum of two shard gradients
instead of one batch's and the normalizers are summed in another order, so the step-0 loss
agrees to float32 rounding (measured 5e-8 relative). Weights: many gradients are near-zero
sums of cancelling terms (the student starts as the teacher), whose rounding error is large
relative to them, and Adam's normalized update g / (sqrt(v) + eps) turns that into a
difference of a fraction of ``lr`` per step: measured max |difference| 2.8e-6 after one
step and 3.4e-6 after four (lr 1e-3; 1.3e-5 / 8.2e-6 without the per-module term), so
atol = 0.05 * lr, 47x below the largest move of the weights (2.35e-3; checked > 20 * atol).
Faults it catches: a task loss normalized per process (max |difference| 1.6e-3, 33x atol),
distillation parts not weighted by the shard's share (3.2e-3, 63x). The CLI run (lr 1e-4,
2 steps) differs by 1.3e-7 with atol 0.05 * lr = 5e-6 (the two faults: 2e-4).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pyzeroq.detection import distributed as ddp
from pyzeroq.detection.cli import main
from pyzeroq.detection.config import QATConfig, SynthesisConfig
from pyzeroq.detection.model import FCOSDetector
from pyzeroq.detection.qat import prepare_qat, run_qat
from pyzeroq.detection.synthesis import synthesize

CANVAS = 64
LR = 1e-3
ATOL = 0.05 * LR   # measured max |difference| 3.4e-6 = 0.0034 * LR (moves: 2.35e-3)
QAT = QATConfig(weight_bits=4, act_bits=8, steps=4, batch_size=5, lr=LR, step_lr=1e-4, w_task=1.0,
                w_modules=0.5, ema_decay=0.9, grad_clip=1.0, warmup=0.25)
SYN = SynthesisConfig(num_images=6, batch_size=2, iters=4, refine_every=0.25, refine_start=0.25,
                      refine_end=0.75, refine_score=0.05)


def _detector() -> FCOSDetector:
    torch.manual_seed(0)
    return FCOSDetector(widths=(4, 4, 4, 4, 4), fpn_width=8, head_convs=1, input_size=CANVAS).eval()


def _cli(out_dir: str, rank: int) -> int:
    """The CLI on the committed detector, a few images and steps; each rank names its own output
    (only rank 0's may appear)."""
    args = ["detect-quantize", "--num-images", "4", "--synth-iters", "2", "--qat-steps", "2", "--quiet",
            "--out", os.path.join(out_dir, f"cli{rank}.pt")]
    return main(args)


def _run(rank: int, world: int, port: int, out: str) -> None:
    """Synthesis + QAT in one of ``world`` processes (process group from torchrun's environment
    variables, as the CLI does); rank 0 saves the results to ``out``; then the CLI."""
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))
        assert ddp.init_from_env("cpu") == "cpu" and torch.distributed.get_backend() == "gloo"
    try:
        det = _detector()
        syn = synthesize(det, SYN, seed=3, progress=False)
        student = prepare_qat(det, QAT)
        log = run_qat(student, det, syn.images, syn.targets, QAT, seed=1, progress=False)
        refused = []
        if world > 1:
            for cfg, n in ((QATConfig(steps=1, batch_size=5, train_bn_stats=True), 6), (QATConfig(steps=1), 1)):
                try:
                    run_qat(prepare_qat(det, cfg), det, syn.images[:n], syn.targets[:n], cfg, progress=False)
                except ValueError as exc:
                    refused.append(str(exc))
        states = [student.state_dict()]
        grads = None
        if world > 1:
            dp = ddp.data_parallel()
            states = dp.gather(student.state_dict())   # every rank's weights
            a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
            if rank == 0:
                a.grad = torch.tensor([1.0, 2.0])
            dp.reduce_gradients([a, b])
            grads = dp.gather((a.grad.tolist(), b.grad))
        if ddp.is_main():
            torch.save({"images": syn.images, "targets": syn.targets, "info": syn.info, "log": log,
                        "state": student.state_dict(), "refused": refused, "states": states, "grads": grads}, out)
        assert _cli(os.path.dirname(out), rank) == 0
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    _run(0, 1, 0, str(one / "run.pt"))
    mp.spawn(_run, args=(2, _free_port(), str(two / "run.pt")), nprocs=2, join=True)
    return torch.load(one / "run.pt", weights_only=False), {**torch.load(two / "run.pt", weights_only=False),
                                                             "dir": two, "one_dir": one}


def test_two_processes_synthesize_the_one_process_set(runs):
    one, two = runs
    assert torch.equal(one["images"], two["images"])
    assert len(one["targets"]) == len(two["targets"]) == SYN.num_images
    for a, b in zip(one["targets"], two["targets"]):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    assert one["info"]["refinement"] == two["info"]["refinement"]
    assert one["info"]["label_quality"] == two["info"]["label_quality"]


def test_two_processes_train_the_one_process_weights(runs):
    one, two = runs
    start = prepare_qat(_detector(), QAT).state_dict()
    moved = 0.0
    for k, a in one["state"].items():
        b = two["state"][k]
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")
            if k in start and "act_quant" not in k:  # act ranges are set by calibration, not training
                moved = max(moved, float((a - start[k]).abs().max()))
        else:
            assert a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b), k
    assert moved > 20 * ATOL  # training moved the weights far beyond the tolerance
    assert len(one["log"]["loss"]) == len(two["log"]["loss"]) == QAT.steps
    # step 0 (equal weights): the sum over ranks is the one-process loss up to float32 rounding
    assert two["log"]["loss"][0] == pytest.approx(one["log"]["loss"][0], rel=1e-6)  # measured 5e-8
    torch.testing.assert_close(torch.tensor(two["log"]["loss"]), torch.tensor(one["log"]["loss"]), rtol=1e-4, atol=0)
    parts1, parts2 = one["log"]["parts"], two["log"]["parts"]
    assert set(parts1) == set(parts2) == {"task", "kd", "mse", "head", "modules"}
    assert parts2["task"] == pytest.approx(parts1["task"], rel=1e-4)
    for k in ("kd", "mse", "head", "modules"):  # tiny (~1e-5) teacher-student gaps: the weight differences show (~2 %)
        assert parts2[k] == pytest.approx(parts1[k], rel=0.1)
    assert len(two["refused"]) == 2
    assert "train_bn_stats" in two["refused"][0] and "one image per process" in two["refused"][1]


def test_single_process_has_no_data_parallel_context():
    assert not torch.distributed.is_initialized()
    assert ddp.data_parallel() is None and ddp.is_main()
    x = torch.tensor([3.0, 4.0])
    assert ddp.global_sum(x) is x


def test_backend_and_env(monkeypatch):
    assert ddp.backend_for("cpu") == "gloo" and ddp.backend_for("cuda") == "nccl"
    assert ddp.backend_for("cuda:1") == "nccl"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert ddp.init_from_env("cpu") == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        ddp.init_from_env("cpu")


def test_scale_parts_keeps_a_globally_normalized_task_loss():
    parts = {"task": torch.tensor(2.0), "kd": torch.tensor(4.0)}
    out = ddp.DataParallel.scale_parts(parts, 3, 4, global_task=True)
    assert out["task"].item() == 2.0 and out["kd"].item() == 3.0
    out = ddp.DataParallel.scale_parts(parts, 3, 4, global_task=False)
    assert out["task"].item() == 1.5
    assert ddp.global_loss(_detector()) and not ddp.global_loss(torch.nn.Linear(1, 1))


def test_ranks_hold_equal_weights_and_gradients(runs):
    _, two = runs
    assert len(two["states"]) == 2
    for k, v in two["states"][0].items():  # clipping, Adam and EMA ran identically on both ranks
        w = two["states"][1][k]
        assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, k
    # a gradient on one rank only reaches both; a parameter without any gradient keeps None
    assert two["grads"] == [([1.0, 2.0], None), ([1.0, 2.0], None)]


def test_cli_under_two_processes(runs):
    one, two = runs
    assert not (two["dir"] / "cli1.pt").exists()  # only rank 0 writes
    a = torch.load(two["one_dir"] / "cli0.pt", weights_only=True)["state_dict"]
    b = torch.load(two["dir"] / "cli0.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    lr = QATConfig().lr
    for k, v in a.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            torch.testing.assert_close(b[k], v, rtol=1e-4, atol=0.05 * lr, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k], k
