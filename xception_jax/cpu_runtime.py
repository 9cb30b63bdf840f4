"""Process-level settings that make XLA's CPU backend faster. Opt-in: call them explicitly.

``tune_malloc``: XLA's CPU runtime allocates every large buffer (activations, gradients: tens
to hundreds of MB per step) with ``malloc``, which glibc serves above its mmap threshold with
fresh ``mmap`` pages and gives back to the OS on ``free``. Every step then page-faults (and the
kernel zeroes) each of those pages again: on 2 cores a plain ``x * 2`` over 61 MB took 46 ms
instead of 7 ms, and a depthwise conv forward 88 ms instead of 23 ms (single core, jax 0.10.2,
glibc 2.36). Raising the mmap and trim thresholds keeps freed memory in the heap for reuse.
The cost: the process keeps its peak heap instead of returning it to the OS between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MAX_INT = 2**31 - 1


def tune_malloc() -> bool:
    """Make glibc malloc reuse freed large blocks instead of unmapping them.

    Takes effect for allocations made after the call, so call it before building the model.
    Returns True when applied, False where it does not apply (not Linux/glibc) or failed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # musl or another libc without mallopt
    ok = mallopt(_M_MMAP_THRESHOLD, _MAX_INT) == 1
    return mallopt(_M_TRIM_THRESHOLD, _MAX_INT) == 1 and ok
