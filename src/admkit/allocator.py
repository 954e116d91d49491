"""Keep freed memory in the process on glibc, so that large tensors stop page-faulting.

glibc serves allocations above its mmap threshold with fresh pages from the kernel and returns
them on free, so every large activation of a CPU forward pass is page-faulted in again; the
threshold adapts only under some allocation patterns. Measured on this project's small 32-px
model (batch 16, 2 cores): a forward pass took ~225 ms with glibc's defaults and ~190 ms with
the thresholds below, the same as after the process had once run a backward pass. The cost is
that the process keeps its peak heap instead of returning it to the system.

``admkit``'s command line calls :func:`keep_freed_memory` at start; ``ADMKIT_MALLOC_TUNING=0``
turns it off. Library users may call it themselves.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when both were set.

    Does nothing (False) off Linux, without glibc, or with ``ADMKIT_MALLOC_TUNING=0``.
    """
    if sys.platform != "linux" or os.environ.get("ADMKIT_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
