"""patches/deepspeed_shm_comm.py: DeepSpeed's collectives on local CPU ranks through its
shared-memory kernel, with gloo's results."""

from __future__ import annotations

import os

import pytest

from soho_scale.engine.patches.deepspeed_shm_comm import PATCH
from tests.engine.local_ranks import two_local_ranks


def test_version_in_tested_range():
    assert PATCH.version_problem() is None


def test_fingerprints_unchanged():
    assert PATCH.fingerprint_problems() == []


PROBE = """
import torch, torch.distributed as dist, deepspeed.comm as ds
from soho_scale.engine.distributed import setup_distributed
import soho_scale.engine.patches.deepspeed_shm_comm as shm
rank, world = setup_distributed()
calls = []
kernel = shm.shm_all_reduce
shm.shm_all_reduce = lambda t: (calls.append(t.numel()), kernel(t))
g = torch.Generator().manual_seed(rank)
x = torch.randn(300_001, generator=g)
mine, gloo = x.clone(), x.clone()
ds.all_reduce(mine)  # DeepSpeed's collective, as ZeRO calls it
dist.all_reduce(gloo)  # torch's gloo
same = [torch.equal(mine, gloo)]
peak, gloo_peak = x.clone(), x.clone()
ds.all_reduce(peak, op=ds.ReduceOp.MAX)  # not a sum: stays on gloo
dist.all_reduce(gloo_peak, op=dist.ReduceOp.MAX)
same.append(torch.equal(peak, gloo_peak))
part = torch.randn(1000, generator=g)
expect = torch.empty(2000)
dist.all_gather_into_tensor(expect, part)
out = torch.full((2000,), 7.0)
ds.all_gather_into_tensor(out, part)
same.append(torch.equal(out, expect))
flat = torch.full((2000,), 7.0)  # ZeRO's case: the input is this rank's slice of the output
flat[rank * 1000 : (rank + 1) * 1000] = part
ds.all_gather_into_tensor(flat, flat[rank * 1000 : (rank + 1) * 1000])
same.append(torch.equal(flat, expect))
later, gloo_later = x.clone(), x.clone()
ds.all_reduce(later, async_op=True).wait()  # asynchronous: stays on gloo, keeps its handle
dist.all_reduce(gloo_later)
same.append(torch.equal(later, gloo_later))
print(calls, same, flush=True)
dist.barrier()
dist.destroy_process_group()
"""

# Without the patch: does DeepSpeed's training all-reduce go through torch.distributed (gloo)?
UPSTREAM_PROBE = """
import torch, torch.distributed as dist, deepspeed.comm as ds
from soho_scale.engine.distributed import setup_distributed
rank, world = setup_distributed()
through_torch = []
torch_all_reduce = dist.all_reduce
dist.all_reduce = lambda *a, **k: (through_torch.append(1), torch_all_reduce(*a, **k))[1]
ds.all_reduce(torch.ones(1000))
print(len(through_torch), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.multiprocess
def test_behaviour_sums_and_gathers_use_the_kernel_and_match_gloo():
    # Spawned ranks name the local world LOCAL_WORLD_SIZE (no LOCAL_SIZE): the set-up still
    # routes DeepSpeed's sums and all-gathers through the kernel, with gloo's results.
    port = str(29500 + os.getpid() % 1000 + 11)
    for last_line in two_local_ranks(PROBE, port, LOCAL_WORLD_SIZE="2"):
        # the kernel ran the SUM and both all-gathers; MAX and the async call stayed on gloo
        assert last_line == "[300001, 2000, 2000] [True, True, True, True, True]"


@pytest.mark.multiprocess
def test_still_needed_deepspeed_all_reduces_over_gloo_on_cpu():
    port = str(29500 + os.getpid() % 1000 + 13)
    lines = two_local_ranks(
        UPSTREAM_PROBE, port, LOCAL_WORLD_SIZE="2", SOHO_DISABLE_PATCHES=PATCH.name
    )
    if lines != ["1", "1"]:
        pytest.fail(
            f"upstream changed: DeepSpeed's all_reduce on CPU no longer goes through "
            f"torch.distributed ({lines}); measure again, delete {PATCH.module}"
        )
