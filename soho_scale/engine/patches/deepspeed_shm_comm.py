"""Speed patch of DeepSpeed on CPU ranks: its blocking SUM all-reduces and its all-gathers run
through DeepSpeed's own shared-memory kernel instead of gloo.

DeepSpeed builds a shared-memory all-reduce kernel (`deepspeed/ops/csrc/cpu/comm/shm.cpp`) on
CPU ranks that are all on one machine, but uses it only for inference; training goes through
gloo's loopback TCP. `use_shm_collectives` replaces `all_reduce` and `all_gather_into_tensor` of
DeepSpeed's comm backend object (`deepspeed.comm.comm.cdb`): eligible calls go to the kernel, an
all-gather becomes "zero the other ranks' slices, all-reduce" (x + 0 = x, except that -0.0 comes
back as +0.0); anything else (asynchronous calls, other ops, sub-groups, other dtypes, tensors of
2 GiB or more, which the kernel's int byte count cannot hold) stays on gloo. Unlike gloo, the
kernel waits for its peers without a time-out: a rank that dies inside a collective leaves the
others spinning until the launcher stops them.

The kernel exists only when DeepSpeed's launcher variable LOCAL_SIZE equals the world size;
`prepare_environment` sets it for ranks started by torch's spawn, which name it LOCAL_WORLD_SIZE.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from data_pipeline.patches.guard import Patch

PATCH = Patch(
    module=__name__,
    library="deepspeed",
    tested=">=0.19.8,<0.20",
    kind="speed",
    relies_on={
        "deepspeed.comm.torch:TorchBackend.__init__": "276f6cb65502be66",
        "deepspeed.comm.torch:TorchBackend.all_reduce": "0769d665e549b085",
        "deepspeed.comm.torch:TorchBackend.all_gather_into_tensor": "1cd95419a00abfb9",
        "deepspeed.comm.torch:TorchBackend.inference_all_reduce": "d75888acc068a94d",
        "deepspeed.comm.torch:TorchBackend._reduce_op": "8402a1c1c3eccba8",
        "deepspeed/ops/csrc/cpu/comm/shm.cpp": "a45dd509dc60a193",
    },
    what="CPU ranks on one machine all-reduce and all-gather through DeepSpeed's shared-memory "
    "kernel instead of gloo",
    buys="CPU demo/CI: a 9.4M fp32 all-reduce in 11.2 ms where gloo takes 24.8, ZeRO-1/2 steps "
    "at 1.04/1.03x a gloo DDP loop where gloo gives 1.22/1.26x, the demo 11.2 min where gloo "
    "takes 12.8 (benchmarks/README.md, engine_overhead); GPU jobs use NCCL and never install it",
)


def supported() -> bool:
    return PATCH.supported()


def install() -> bool:
    return PATCH.install()


def prepare_environment() -> None:
    """Before `deepspeed.init_distributed` on CPU ranks: name the local rank count the way
    DeepSpeed's kernel set-up reads it (a lone rank needs no kernel)."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    if local != "1" and local == os.environ.get("WORLD_SIZE") and PATCH.install():
        os.environ.setdefault("LOCAL_SIZE", local)


def shm_all_reduce(tensor: torch.Tensor) -> None:
    """Sum `tensor` in place over all ranks with DeepSpeed's shared-memory CPU kernel."""
    torch.ops.deepspeed.inference_all_reduce_(tensor)


def use_shm_collectives() -> bool:
    """After `deepspeed.init_distributed` on CPU ranks: route DeepSpeed's eligible all-reduces
    and all-gathers through the kernel. Returns whether it is on."""
    if not PATCH.install():
        return False
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
