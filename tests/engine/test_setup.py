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
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    base.update(WORLD_SIZE="2", LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SHM_PROBE],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == "[False, False] 3.0"
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)
    names = [shm_allreduce_segment(r) for r in range(2)]
    assert all(n.startswith("/dev/shm/deepspeed_allreduce_buffer_") for n in names)
    assert not any(os.path.exists(n) for n in names)
