"""patches/deepspeed_shm_segment.py: CPU ranks leave no DeepSpeed all-reduce segment behind."""

from __future__ import annotations

import os

import pytest

from soho_scale.engine.patches.deepspeed_shm_segment import PATCH, segment_path
from tests.engine.local_ranks import two_local_ranks

PROBE = """
import os, torch, deepspeed.comm
from soho_scale.engine.distributed import setup_distributed
from soho_scale.engine.patches.deepspeed_shm_segment import segment_path
rank, world = setup_distributed()
torch.distributed.barrier()  # every rank has finished its set-up
exists = [os.path.exists(segment_path(r)) for r in range(world)]
tensor = torch.ones(1000) * (rank + 1)
deepspeed.comm.inference_all_reduce(tensor)  # DeepSpeed's shared-memory all-reduce
print(exists, float(tensor[0]))
"""


def test_version_in_tested_range():
    assert PATCH.version_problem() is None


def test_fingerprints_unchanged():
    assert PATCH.fingerprint_problems() == []


def _segments(port: str) -> list[str]:
    os.environ["MASTER_ADDR"], saved = "127.0.0.1", os.environ.get("MASTER_ADDR")
    os.environ["MASTER_PORT"], saved_port = port, os.environ.get("MASTER_PORT")
    try:
        return [segment_path(r) for r in range(2)]
    finally:
        for key, value in (("MASTER_ADDR", saved), ("MASTER_PORT", saved_port)):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.multiprocess
def test_behaviour_segments_are_gone_and_the_all_reduce_still_works():
    port = str(29500 + os.getpid() % 1000 + 7)
    for last_line in two_local_ranks(PROBE, port, LOCAL_SIZE="2"):
        assert last_line == "[False, False] 3.0"
    names = _segments(port)
    assert all(n.startswith("/dev/shm/deepspeed_allreduce_buffer_") for n in names)
    assert not any(os.path.exists(n) for n in names)


@pytest.mark.multiprocess
def test_still_needed_deepspeed_leaves_its_segments_in_dev_shm():
    port = str(29500 + os.getpid() % 1000 + 9)
    names = _segments(port)
    try:
        lines = two_local_ranks(PROBE, port, LOCAL_SIZE="2", SOHO_DISABLE_PATCHES=PATCH.name)
        left = [n for n in names if os.path.exists(n)]
        assert all(line.endswith(" 3.0") for line in lines)
        if not left:
            pytest.fail(f"upstream changed: DeepSpeed unlinks its segments; delete {PATCH.module}")
        assert left == names
    finally:
        for name in names:
            if os.path.exists(name):
                os.unlink(name)
