"""Packaging: one version source, optional dependencies fail with the extra to install,
and no flat-layout package in the checkout can shadow the installed build."""

import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyzeroq
from pyzeroq._optional import require

REPO = Path(__file__).resolve().parents[1]


def test_version_has_one_source():
    assert pyzeroq.__version__ == importlib.metadata.version("pyzeroq")
    assert "version =" not in (REPO / "pyproject.toml").read_text().split("[project]")[1].split("[")[0]


def test_checkout_has_no_flat_package_to_shadow_the_build():
    assert not (REPO / "pyzeroq").exists() and (REPO / "src" / "pyzeroq" / "__init__.py").exists()
    assert (Path(pyzeroq.__file__).parent / "_core.pyi").exists()


def test_require_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'pyzeroq\[onnx\]'") as info:
        require("pyzeroq_no_such_module", "onnx", "ONNX export")
    assert "ONNX export" in str(info.value) and "pyzeroq_no_such_module" in str(info.value)


def _export_call():
    from toy_models import trained_tiny
    cfg = pyzeroq.QuantConfig(calibration="gaussian", num_samples=4, progress=False)
    qmodel = pyzeroq.quantize(trained_tiny(steps=0), cfg, input_shape=(1, 16, 16))
    return lambda: pyzeroq.export_onnx(qmodel, "unused.onnx", np.zeros((1, 1, 16, 16), np.float32))


def _coco_call():
    from pyzeroq import detection
    _, coco = detection.make_scenes("test", 1, seed=0)
    empty = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32), "labels": np.zeros(0, np.int64)}
    return lambda: detection.coco_map(coco, [empty])


def _plot_call():
    from pyzeroq.pipeline import QuantReport
    report = QuantReport(frontier={"cost": [1], "size_bytes": [1.0], "total_sensitivity": [0.5]},
                         chosen={"size_bytes": 1.0, "estimate": 0.5, "budget_bytes": 1.0})
    return lambda: report.plot_pareto("unused.png")


@pytest.mark.parametrize("module, extra, make_call", [
    ("onnx", "onnx", _export_call), ("pycocotools", "detection", _coco_call), ("matplotlib", "plot", _plot_call)])
def test_missing_optional_dependency_names_its_extra(monkeypatch, tmp_path, module, extra, make_call):
    monkeypatch.chdir(tmp_path)
    call = make_call()  # valid arguments: only the missing module can fail
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # "import module" now raises ImportError
    with pytest.raises(ImportError, match=rf"pyzeroq\[{extra}\]"):
        call()


def test_torch_is_the_cpu_pin_or_newer():
    assert tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 1)
