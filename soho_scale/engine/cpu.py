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


def shm_all_reduce(tensor: torch.Tensor) -> None:
    """Sum `tensor` in place over all ranks with DeepSpeed's shared-memory CPU kernel."""
    torch.ops.deepspeed.inference_all_reduce_(tensor)


def use_shm_collectives() -> bool:
    """Run DeepSpeed's blocking SUM all-reduces and its all-gathers over every rank through its
    shared-memory CPU kernel instead of gloo (call after `deepspeed.init_distributed`).

    DeepSpeed builds that kernel (deepspeed/ops/csrc/cpu/comm/shm.cpp) on CPU ranks that are all on
    one machine (LOCAL_SIZE == world size) but uses it only for inference; training goes through
    gloo's loopback TCP. On 2 ranks and 9.4M fp32 values (the tiny model) gloo took 24.8 ms to
    all-reduce and 36.1 ms to all-gather (ZeRO-1/2 gather the updated weights every step); the
    kernel all-reduces in 11.2 ms. An all-gather becomes: zero the other ranks' slices, all-reduce
    (x + 0 = x, except that -0.0 comes back as +0.0). Anything else (asynchronous calls, other
    ops, sub-groups, other dtypes, tensors of 2 GiB or more, which the kernel's int byte count
    cannot hold) stays on gloo. Unlike gloo, the kernel waits for its peers without a time-out:
    a rank that dies inside a collective leaves the others spinning until the launcher stops
    them. Returns whether it is on.
    """
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist

    backend = ds_comm.cdb
    world = dist.get_world_size()
    kernel = getattr(getattr(torch.ops, "deepspeed", None), "inference_all_reduce_", None)
    level = getattr(backend, "shm_vector_kernel_level", 0)  # 1: fp32 (avx2), 2: also bf16/fp16
    if world < 2 or kernel is None or level < 1 or os.environ.get("LOCAL_SIZE") != str(world):
        return False  # the kernel only exists when every rank is local; it faults otherwise
    dtypes = {torch.float32} | ({torch.bfloat16, torch.float16} if level >= 2 else set())
    gloo_all_reduce, gloo_all_gather = backend.all_reduce, backend.all_gather_into_tensor

    def eligible(tensor: torch.Tensor, group: Any, async_op: bool) -> bool:
        return (
            not async_op
            and tensor.device.type == "cpu"
            and tensor.dtype in dtypes
            and tensor.is_contiguous()
            and tensor.numel() * tensor.element_size() < 2**31
            and (group is None or dist.get_world_size(group) == world)
        )

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):  # noqa: ANN001, ANN202
        if eligible(tensor, group, async_op) and backend._reduce_op(op) == dist.ReduceOp.SUM:
            shm_all_reduce(tensor)
            return None
        return gloo_all_reduce(tensor, op, group, async_op)

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):  # noqa: ANN001, ANN202
        if not (
            eligible(output_tensor, group, async_op)
            and input_tensor.dtype == output_tensor.dtype
            and output_tensor.numel() == world * input_tensor.numel()
        ):
            return gloo_all_gather(output_tensor, input_tensor, group, async_op)
        rank = dist.get_rank(group)
        slices = output_tensor.view(-1).chunk(world)
        mine = slices[rank]
        aliased = input_tensor.is_contiguous() and mine.data_ptr() == input_tensor.data_ptr()
        if not aliased:  # ZeRO passes a view of its own slice: nothing to copy
            mine.copy_(input_tensor.reshape(-1))
        for i, other in enumerate(slices):
            if i != rank:
                other.zero_()
        shm_all_reduce(output_tensor)
        return None

    backend.all_reduce = all_reduce
    backend.all_gather_into_tensor = all_gather_into_tensor
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
