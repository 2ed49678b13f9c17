"""keep_freed_memory: glibc keeps freed tensors' memory in the process (fewer page faults), the
pyzeroq command turns it on, a library import does not."""

import platform
import subprocess
import sys
import textwrap

import pytest

from pyzeroq import cli
from pyzeroq.allocator import keep_freed_memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

CHURN = textwrap.dedent("""
    import resource, sys, torch
    from pyzeroq import models
    from pyzeroq.allocator import keep_freed_memory
    from pyzeroq.distill import distill_data
    torch.set_num_threads(1)
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    model = models.load_pretrained("resnet20")
    distill_data(model, (1, 28, 28), num_samples=32, iters=3, progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    distill_data(model, (1, 28, 28), num_samples=32, iters=20, progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")



@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_freed_tensors_are_reused_without_page_faults():
    faults = {mode: int(subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True,
                                       check=True).stdout.split()[-1]) for mode in ("default", "keep")}
    # default: the activations' pages go back to the kernel and are faulted in again at every step
    assert faults["default"] > 500 * 20, faults
    assert faults["keep"] * 5 < faults["default"], faults


@pytest.mark.parametrize("kwargs, error", [(dict(mmap_threshold=1.5), TypeError), (dict(trim_threshold=True), TypeError),
                                           (dict(mmap_threshold=0), ValueError), (dict(trim_threshold=2**31), ValueError)])
def test_bad_thresholds(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        keep_freed_memory(**kwargs)


SPY = textwrap.dedent("""
    import ctypes
    calls = []
    class Spy(ctypes.CDLL):  # records every lookup of mallopt in a C library
        def __getattr__(self, name):
            calls.append(name) if name == "mallopt" else None
            return super().__getattr__(name)
    ctypes.CDLL = Spy
    import torch, pyzeroq, pyzeroq.cli, pyzeroq.allocator
    print(len(calls), end=" ")
    pyzeroq.allocator.keep_freed_memory()
    print(len(calls))
""")


def test_the_command_turns_it_on_and_the_library_import_does_not(monkeypatch, capsys):
    out = subprocess.run([sys.executable, "-c", SPY], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "0" and (out[1] == "1" or not GLIBC)
    calls = []
    monkeypatch.setattr("pyzeroq.allocator.keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["quantize", "--model", "resnet20", "--mixed", "2,4,8"]) == 2  # no --avg-weight-bits
    assert calls == [1]
    assert "--avg-weight-bits" in capsys.readouterr().err
