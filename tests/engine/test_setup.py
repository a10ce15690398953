"""Process set-up of a training rank (soho_scale.engine.trainer.setup_distributed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import torch
from soho_scale.engine.trainer import setup_distributed
setup_distributed()
print(torch.get_num_threads())
"""


def _threads_after_setup(env_extra: dict[str, str]) -> int:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    env.update(MASTER_PORT=str(29500 + os.getpid() % 1000), **env_extra)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to split")
def test_cpu_ranks_split_the_cores_between_them():
    cores = len(os.sched_getaffinity(0))
    # The DeepSpeed launcher says LOCAL_SIZE; each of 2 local ranks takes half the cores
    # (torch's default, all of them per rank, oversubscribes the machine).
    assert _threads_after_setup({"LOCAL_SIZE": "2"}) == cores // 2
    # An explicit OMP_NUM_THREADS is the user's choice and stays.
    assert _threads_after_setup({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": str(cores)}) == cores


def _two_local_ranks(probe: str, port: str, **env: str) -> list[str]:
    """Run `probe` as ranks 0 and 1 of a 2-process world on this machine: each one's last line."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_SIZE")}
    base.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", probe],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        results = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:  # a rank left behind would wait for its peer forever
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    return [out.strip().splitlines()[-1] for out, _ in results]


SHM_PROBE = """
import os, torch, deepspeed.comm
from soho_scale.engine.cpu import shm_allreduce_segment
from soho_scale.engine.trainer import setup_distributed
rank, world = setup_distributed()
torch.distributed.barrier()  # every rank has finished its set-up
exists = [os.path.exists(shm_allreduce_segment(r)) for r in range(world)]
tensor = torch.ones(1000) * (rank + 1)
deepspeed.comm.inference_all_reduce(tensor)  # DeepSpeed's shared-memory all-reduce
print(exists, float(tensor[0]))
"""


@pytest.mark.multiprocess
def test_cpu_ranks_leave_no_shared_memory_behind(monkeypatch: pytest.MonkeyPatch):
    # DeepSpeed's CPU all-reduce segment (~69 MB per rank) is unlinked once every rank mapped it:
    # nothing stays in /dev/shm, and the shared-memory all-reduce still works.
    from soho_scale.engine.cpu import shm_allreduce_segment

    port = str(29500 + os.getpid() % 1000 + 7)
    for last_line in _two_local_ranks(SHM_PROBE, port, LOCAL_SIZE="2"):
        assert last_line == "[False, False] 3.0"
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)
    names = [shm_allreduce_segment(r) for r in range(2)]
    assert all(n.startswith("/dev/shm/deepspeed_allreduce_buffer_") for n in names)
    assert not any(os.path.exists(n) for n in names)


SHM_COLLECTIVES_PROBE = """
import torch, torch.distributed as dist, deepspeed.comm as ds
from soho_scale.engine.trainer import setup_distributed
import soho_scale.engine.cpu as cpu
rank, world = setup_distributed()
calls = []
kernel = cpu.shm_all_reduce
cpu.shm_all_reduce = lambda t: (calls.append(t.numel()), kernel(t))
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


@pytest.mark.multiprocess
def test_deepspeed_collectives_on_local_cpu_ranks_use_shared_memory_and_match_gloo():
    # Spawned ranks name the local world LOCAL_WORLD_SIZE (no LOCAL_SIZE): setup_distributed still
    # routes DeepSpeed's sums and all-gathers through its shared-memory kernel, with gloo's results.
    port = str(29500 + os.getpid() % 1000 + 11)
    for last_line in _two_local_ranks(SHM_COLLECTIVES_PROBE, port, LOCAL_WORLD_SIZE="2"):
        # the kernel ran the SUM and both all-gathers; MAX and the async call stayed on gloo
        assert last_line == "[300001, 2000, 2000] [True, True, True, True, True]"
