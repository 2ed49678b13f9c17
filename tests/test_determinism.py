"""Same arguments, same quantized model: across fresh processes, within one process, and
whatever the caller's RNG state; quantize leaves the global RNGs as they were.

Run as a script (``python test_determinism.py MODEL_PT OUT_PT``) it quantizes the saved
TinyNet (and the bundled resnet20 when present) in mixed precision with the grouped search
and saves every tensor of the result: the fresh-process half of the comparison.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyzeroq as zq
from pyzeroq import models
from pyzeroq.modules import act_quants

TINY_SHAPE = (1, 16, 16)
MNIST_SHAPE = (1, 28, 28)
# mixed precision with the Appendix-A grouped search, kept small (a few seconds per model)
MP = dict(weight_bits=(2, 4, 8), avg_weight_bits=4, act_bits=8, mp_relaxation=True, num_samples=8,
          distill_iters=5, distill_batch_size=8, mp_group_size=2, mp_size_bins=20, mp_eval_samples=4,
          mp_keep_estimate=4, mp_keep_exact=2, progress=False)
THREADS = 1  # the same thread count in every compared run (float reductions follow it)


def _has_resnet20() -> bool:
    return "resnet20" in models.registry()


def snapshot(qmodel) -> dict:
    """Everything a quantized model is made of: state_dict (quantizer extra state included),
    bit widths, every tensor / number held by an activation quantizer (scale, zero point,
    observed range), and the selection part of the report."""
    acts = {}
    for name, quant in act_quants(qmodel.graph_module).items():
        acts[name] = {k: v for k, v in vars(quant).items()
                      if isinstance(v, (torch.Tensor, float, int, np.ndarray)) and not isinstance(v, bool)}
    report = qmodel.report
    return {"state": qmodel.state_dict(), "bit_widths": dict(qmodel.bit_widths), "acts": acts,
            "report": {"sensitivity": report.sensitivity, "chosen": report.chosen, "frontier": report.frontier,
                       "relaxation": report.relaxation, "distill_loss": report.distill_loss}}


def _quantize_all(tiny_state: dict) -> dict:
    from toy_models import TinyNet
    tiny = TinyNet()
    tiny.load_state_dict(tiny_state)
    out = {"tiny": snapshot(zq.quantize(tiny.eval(), zq.QuantConfig(**MP), input_shape=TINY_SHAPE))}
    if _has_resnet20():
        resnet = models.load_pretrained("resnet20")
        out["resnet20"] = snapshot(zq.quantize(resnet, zq.QuantConfig(**MP), input_shape=MNIST_SHAPE))
    return out


def assert_identical(a, b, path: str = "") -> None:
    """Bit-for-bit equality of nested dicts / lists of tensors, arrays and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a), list(b))
        for k in a:
            assert_identical(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, float) and np.float64(a).tobytes() == np.float64(b).tobytes(), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def test_two_fresh_processes_give_bit_identical_models(tmp_path, one_thread):
    from toy_models import trained_tiny
    model_path = tmp_path / "tiny.pt"
    torch.save(trained_tiny().state_dict(), model_path)
    import pyzeroq
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(pyzeroq.__file__))), os.path.dirname(__file__)]))
    results = []
    for run in range(2):
        out = tmp_path / f"run{run}.pt"
        subprocess.run([sys.executable, os.path.abspath(__file__), str(model_path), str(out)],
                       check=True, cwd=tmp_path, env=env)
        results.append(torch.load(out, weights_only=False))
    assert set(results[0]) == ({"tiny", "resnet20"} if _has_resnet20() else {"tiny"})
    assert results[0]["tiny"]["report"]["relaxation"] is not None  # the grouped search ran
    assert len(set(results[0]["tiny"]["bit_widths"].values())) > 1  # and chose mixed bits
    assert_identical(results[0], results[1])
    # this (already used) process agrees with the fresh ones
    assert_identical(_quantize_all(torch.load(model_path, weights_only=True)), results[0])


def test_same_process_twice_is_bit_identical_whatever_the_global_rng(one_thread):
    from toy_models import trained_tiny
    model = trained_tiny()
    cfg = zq.QuantConfig(**MP)
    torch.manual_seed(123)
    a = snapshot(zq.quantize(model, cfg, input_shape=TINY_SHAPE))
    torch.manual_seed(7)
    torch.rand(5)
    np.random.seed(7)
    b = snapshot(zq.quantize(model, cfg, input_shape=TINY_SHAPE))
    assert_identical(a, b)


@pytest.mark.parametrize("calibration", ["distilled", "gaussian"])
def test_quantize_leaves_the_global_rng_untouched(calibration):
    from toy_models import trained_tiny
    model = trained_tiny()
    torch.manual_seed(2024)
    np.random.seed(2024)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    zq.quantize(model, zq.QuantConfig(**dict(MP, calibration=calibration)), input_shape=TINY_SHAPE)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_selection_is_a_pure_function_of_its_inputs():
    """No process-wide memo: select_bits recomputes (same result) and the module keeps no cache."""
    from toy_models import trained_tiny

    from pyzeroq import pipeline
    from pyzeroq.modules import prepare
    assert not [name for name in vars(pipeline) if "cache" in name.lower() and not name.startswith("__")]
    q = zq.quantize(trained_tiny(), zq.QuantConfig(**MP), input_shape=TINY_SHAPE)
    cfg = q.config
    gm, info = prepare(trained_tiny())
    data = torch.rand(8, *TINY_SHAPE, generator=torch.Generator().manual_seed(0))
    omega = np.array([[q.report.sensitivity[n][b] for b in cfg.weight_candidates] for n in q.report.layers])
    cost, budget = pipeline.cost_matrix(q.report, cfg)
    first = pipeline.select_bits(gm, info.layers, data, omega, cost, budget, cfg)
    second = pipeline.select_bits(gm, info.layers, data, omega, cost, budget, cfg)
    assert first == second and first.relaxation is not None
    assert first.relaxation.evaluations == second.relaxation.evaluations > 0  # both searched


if __name__ == "__main__":
    torch.set_num_threads(THREADS)
    torch.save(_quantize_all(torch.load(sys.argv[1], weights_only=True)), sys.argv[2])
