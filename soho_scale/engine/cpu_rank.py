"""Process settings of a CPU rank (gloo): what the GPU-first defaults of glibc and torch cost
there.

DeepSpeed frees and re-allocates its gradient buffers (ZeRO buckets, flattened gradients) every
step. glibc serves allocations above 32 MB with fresh mmap pages and gives freed heap tops back
to the OS, so every step faults ~80 MB of pages back in (tens of ms of system time per step);
a DDP loop reuses its buckets and faults none (benchmarks/README.md, engine_overhead). And torch
gives every process all cores, which oversubscribes them when several ranks share a machine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse: no mmap for large blocks, no trimming of the heap.

    Per-step buffers then come back without page faults; the price is that the process keeps its
    peak heap (training processes reach their peak in the first steps anyway). Skipped when the
    user tunes the allocator (MALLOC_* variables, or an allocator in LD_PRELOAD) and on non-glibc
    systems. Returns whether it changed anything.
    """
    if any(k.startswith("MALLOC_") for k in os.environ) or "alloc" in os.environ.get(
        "LD_PRELOAD", ""
    ):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, TypeError, AttributeError):
        return False  # not glibc (musl, macOS): nothing to tune
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if not done:
        logger.debug("mallopt refused; allocator left as it is")
    return done


def share_cores(local_ranks: int) -> None:
    """Each of `local_ranks` CPU ranks takes its share of the cores (unless OMP_NUM_THREADS says
    otherwise): torch's default, all cores per process, oversubscribes them N times over (it
    halves the demo's step rate on 2 cores)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, local_ranks)))
