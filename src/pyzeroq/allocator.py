"""Keep freed memory in the process: fewer page faults for torch's short-lived CPU tensors.

torch allocates every CPU tensor with ``posix_memalign`` and frees it when the last reference
goes. With glibc's default settings, blocks above the mmap threshold (128 KiB at first, then
the size of the largest freed mmapped block) are fresh ``mmap`` pages, and freed memory at
the top of the heap beyond twice that is handed back to the kernel -- so an optimization loop
that allocates and frees the same activations at every step touches new pages at every step.
Data distillation of the README's ResNet-20 took 0.3-1.1 M minor page faults and up to
~2.4 s of system time in ~12 s (``bench/cli_overheads.py``; 25-28 k faults with this
setting). PyTorch's CPU performance guide recommends jemalloc or tcmalloc for the same
reason; :func:`keep_freed_memory` gets most of it from glibc itself with ``mallopt`` (the
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
environment variables set the same from outside a process).

It changes the allocator of the whole process and cannot be undone; values are not affected
(only where memory comes from). The ``pyzeroq`` command calls it at start; a library call does
not (your process, your allocator).
"""

from __future__ import annotations

import ctypes
import platform
import sys

__all__ = ["keep_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

M_TRIM_THRESHOLD = -1  # glibc <malloc.h> mallopt parameters
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # blocks up to it come from the heap (the ceiling of glibc's own dynamic threshold on 64-bit)
TRIM_THRESHOLD = 256 * 1024 * 1024  # free memory kept at the top of the heap before it is returned


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap threshold and trim threshold (bytes) for this process with ``mallopt``:
    blocks up to ``mmap_threshold`` are reused from the heap instead of mapped afresh, and up
    to ``trim_threshold`` bytes of freed heap stay in the process. Returns True when both were
    set; False elsewhere than Linux with glibc (musl, macOS, Windows; nothing changed) or when
    glibc refuses a value (older versions refuse an mmap threshold above 32 MiB on 64-bit).
    TypeError / ValueError for thresholds that are not ints in [1, 2**31 - 1]."""
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int (bytes), got {type(value).__name__}")
        if not 0 < value < 2**31:
            raise ValueError(f"{name} must be in [1, 2**31 - 1] bytes, got {value}")
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: setting either one fixes both (no more dynamic adjustment), and a
    # large trim threshold with the initial 128 KiB mmap threshold would map every activation anew
    if mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1:
        return False
    return mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
