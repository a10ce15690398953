"""Settings for CPU ranks (gloo): what the GPU-first defaults of DeepSpeed and glibc cost there.

Measured with benchmarks/engine_overhead.py (2 CPU ranks, tiny model, fp32). DeepSpeed frees and
re-allocates its gradient buffers (ZeRO buckets, flattened gradients) every step. glibc serves
allocations above 32 MB with fresh mmap pages and gives freed heap tops back to the OS, so every
step faulted ~80 MB of pages back in (~20k minor faults, tens of ms of system time per step);
the DDP loop reuses its buckets and faults none.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Any

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
    halved the demo's step rate on 2 cores)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, local_ranks)))


def shm_allreduce_segment(rank: int) -> str:
    """/dev/shm path of the all-reduce segment DeepSpeed's CPU comm op creates for `rank` when
    all ranks are local (deepspeed/ops/csrc/cpu/comm/shm.cpp: SHM_BUFFER_NAME_uid_addr_port_rank).
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_allreduce_segment(rank: int) -> bool:
    """Unlink this rank's DeepSpeed all-reduce segment (~69 MB of /dev/shm per rank).

    DeepSpeed creates it in `init_distributed` on CPU ranks that are all on one machine and never
    unlinks it, so every run leaked it, killed or not: after a day of runs this machine's
    /dev/shm held 18 GB of them and the test suite slowed to a crawl for want of memory. Call this
    after every rank has mapped every other rank's segment (`init_distributed` returns only then;
    a barrier makes it true for all ranks): the mappings stay valid until the processes exit and
    the name is gone even if they are killed. Returns whether a segment was removed.
    """
    try:
        os.unlink(shm_allreduce_segment(rank))
    except FileNotFoundError:
        return False
    return True


def tune_for_cpu(ds_config: dict[str, Any]) -> dict[str, Any]:
    """ZeRO-1/2 settings for CPU ranks, where two GPU-template choices only add work.

    DeepSpeed's CPU accelerator has no streams, so the gradient reduction runs synchronously in
    the backward hooks whatever `overlap_comm` says; `overlap_comm` then only adds a second
    bucket-sized gradient buffer. `reduce_scatter` (with the default multi-rank bucket all-reduce)
    all-reduces a flattened copy of the gradient bucket and copies it back; without it the
    contiguous bucket is all-reduced in place. Changes `ds_config` in place and returns it.
    """
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") in (1, 2):
        zero["overlap_comm"] = False
        zero["reduce_scatter"] = False
    return ds_config
