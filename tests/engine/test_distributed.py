"""Process set-up of a training rank (soho_scale.engine.distributed.setup_distributed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import torch
from soho_scale.engine.distributed import setup_distributed
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
