"""Joining the process group, once for training and evaluation alike.

The launcher (DeepSpeed's, torchrun, or nothing for a lone process) describes the group in the
environment; the same code runs on CPU over gloo and on GPUs over NCCL. Training joins through
DeepSpeed (`deepspeed.init_distributed`), which on CPU ranks also sets up DeepSpeed's shared-memory
collectives (patches/deepspeed_shm_comm.py); evaluation joins through torch and only when there
is more than one rank.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.loopback import free_port
from soho_scale.engine.cpu_rank import keep_freed_memory, share_cores
from soho_scale.engine.patches import deepspeed_shm_comm, deepspeed_shm_segment


def _describe_lone_process() -> None:
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    # DeepSpeed's launcher names the local rank count LOCAL_SIZE; streaming reads
    # LOCAL_WORLD_SIZE (default 1, which makes every rank a "node leader" and breaks its
    # shared-memory set-up).
    if "LOCAL_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["LOCAL_SIZE"])


def setup_distributed(deepspeed: bool = True) -> tuple[int, int]:
    """Join the group the launcher describes; returns (rank, world size).

    `deepspeed`: training ranks (a lone process makes a group of one, CPU ranks get their process
    settings and DeepSpeed's shared-memory collectives); otherwise evaluation ranks (no group for
    a lone process)."""
    if not deepspeed and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        return 0, 1
    _describe_lone_process()
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if deepspeed:
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            keep_freed_memory()  # DeepSpeed re-allocates its buffers every step
            share_cores(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            deepspeed_shm_comm.prepare_environment()
        import deepspeed as ds

        ds.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend)
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    elif deepspeed:
        dist.barrier()  # every rank has mapped every shared-memory segment once all are here
        if deepspeed_shm_segment.install():
            deepspeed_shm_segment.release_segment(dist.get_rank())
        deepspeed_shm_comm.use_shm_collectives()
    return dist.get_rank(), dist.get_world_size()


def node_index() -> int:
    """This rank's node (the node launcher's CROSS_RANK; torchrun's GROUP_RANK)."""
    return int(os.environ.get("CROSS_RANK", os.environ.get("GROUP_RANK", 0)))


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (run ids and paths: never per-rank timestamps)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def setup_logging(rank: int) -> None:
    """One log format for every rank; ranks other than 0 log warnings and errors only."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    if rank != 0:
        logging.getLogger("soho_scale").setLevel(logging.WARNING)


def device() -> torch.device:
    """This rank's device."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def to_device(batch: dict[str, Any], where: torch.device, dtype: torch.dtype | None = None) -> dict:
    """The batch's tensors on `where`; floating ones also cast to `dtype` when given."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(where, non_blocking=True)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out
