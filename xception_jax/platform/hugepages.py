"""Transparent huge pages for glibc's malloc, which XLA CPU's buffers come from.

XLA's CPU runtime allocates each run's temporary buffers afresh; glibc serves such large blocks
with new ``mmap`` regions, so every train step page-faults its whole working set back in, 4 KiB
at a time. Measured on the full model at 299px batch 8 (2 cores): ~764,000 minor faults and
1.5-1.8 s of kernel time per step. glibc's documented tunable ``glibc.malloc.hugetlb=1``
(glibc >= 2.35) makes malloc ask for transparent huge pages on those regions: ~2,000 faults,
0.4 s of kernel time, and steps ~1.25x faster (benchmarks/compare.py --glibc-tunables). Tunables
are read once at process start, hence a re-execution of the same command line.

This module imports nothing heavy: it runs before JAX is loaded.
"""

from __future__ import annotations

import os
import platform
import sys

_TUNABLE_NAME = "glibc.malloc.hugetlb"
TUNABLE = f"{_TUNABLE_NAME}=1"
OPT_OUT_VARIABLE = "XCEPTION_JAX_HUGEPAGES"  # set to 0 to keep malloc's default
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def supported() -> bool:
    """Whether glibc (>= 2.35) takes the tunable and the kernel has THP not set to 'never'."""
    lib, version = platform.libc_ver()
    try:
        major, minor = (int(v) for v in version.split(".")[:2])
    except ValueError:
        return False
    if lib != "glibc" or (major, minor) < (2, 35):
        return False
    try:
        with open(_THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _hugetlb_setting() -> str | None:
    """The value ``GLIBC_TUNABLES`` gives ``glibc.malloc.hugetlb``, or None when unset."""
    for item in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        if name == _TUNABLE_NAME:
            return value
    return None


def active() -> bool:
    """Whether this process was started with huge pages for malloc."""
    return _hugetlb_setting() not in (None, "0")


def reexec_with_hugepages() -> None:
    """Re-run this process's exact command line with ``TUNABLE`` added to ``GLIBC_TUNABLES``.

    Does nothing when the user (or a previous re-execution) set ``glibc.malloc.hugetlb`` to any
    value, when ``XCEPTION_JAX_HUGEPAGES=0``, or where it is not supported. Call it first thing in a
    ``__main__`` block: the process image is replaced (same PID, signals and stdio).
    """
    opted_out = os.environ.get(OPT_OUT_VARIABLE, "1") == "0"
    if _hugetlb_setting() is not None or opted_out or not supported():
        return
    tunables = os.environ.get("GLIBC_TUNABLES")
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
