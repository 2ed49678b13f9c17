"""Threads of pyzeroq's C++ kernels: one setting for all of them.

The quantization kernels of :mod:`pyzeroq.ops` (quantize, dequantize, fake_quantize, the STE
gradient, asymmetric_params) and the integer simulator of :mod:`pyzeroq.integer` (convolution,
matmul, requantize, add, pooling) share one persistent thread pool, started on the first call
that needs it (not at import). A call whose work is below ``MIN_PARALLEL_WORK`` elementary
operations per thread (elements, or multiply-adds for a convolution) runs on the calling
thread. Results are bit-identical for every thread count. Calls from several Python threads
are safe: one call at a time uses the pool, the others run single-threaded meanwhile.

torch's own threads are separate (``torch.set_num_threads``).
"""

from __future__ import annotations

import operator

from pyzeroq import _core

__all__ = ["set_num_threads", "get_num_threads", "MAX_THREADS", "MIN_PARALLEL_WORK"]

MAX_THREADS: int = _core.MAX_THREADS
MIN_PARALLEL_WORK: int = _core.MIN_PARALLEL_WORK


def set_num_threads(num_threads: int) -> None:
    """Run every C++ kernel on ``num_threads`` threads (1: single-threaded, on the caller).

    The default is the number of CPUs (``os.cpu_count()``-like, capped at ``MAX_THREADS``).
    Waits for a kernel running in another Python thread to finish. Raises TypeError if
    ``num_threads`` is not an integer (bool included), ValueError outside 1..``MAX_THREADS``.
    """
    if isinstance(num_threads, bool):
        raise TypeError("num_threads must be an int, got bool")
    try:
        n = operator.index(num_threads)
    except TypeError:
        raise TypeError(f"num_threads must be an int, got {type(num_threads).__name__}") from None
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"num_threads must be in [1, {MAX_THREADS}], got {n}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """The thread count of the C++ kernels (see :func:`set_num_threads`)."""
    return int(_core.get_num_threads())
