"""patches/torch_shm_batch_files.py: /dev/shm batch files of killed loader workers go away."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys

import pytest

from data_pipeline.patches.torch_shm_batch_files import PATCH, remove_orphans


def test_version_in_tested_range():
    assert PATCH.version_problem() is None


def test_fingerprints_unchanged():
    assert PATCH.fingerprint_problems() == []


def test_behaviour_removes_only_the_files_of_processes_that_are_gone(tmp_path):
    dead = multiprocessing.get_context("fork").Process(target=int)
    dead.start()
    dead.join()
    for name in (f"torch_{dead.pid}_12_3", f"torch_{os.getpid()}_12_3", "torch_x_1", "other_1_2"):
        (tmp_path / name).write_bytes(b"batch")
    assert remove_orphans(str(tmp_path)) == [f"torch_{dead.pid}_12_3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"torch_{os.getpid()}_12_3", "torch_x_1", "other_1_2"]
    )


def test_behaviour_keeps_a_dead_workers_file_that_a_live_process_still_maps(tmp_path):
    dead = multiprocessing.get_context("fork").Process(target=int)
    dead.start()
    dead.join()
    path = tmp_path / f"torch_{dead.pid}_12_3"
    path.write_bytes(b"batch")
    with open(path, "rb"):  # the batch received by a live loader (another job's, say)
        assert remove_orphans(str(tmp_path)) == []
    assert remove_orphans(str(tmp_path)) == [path.name]


# A process that shares a tensor as loader workers do (file_system strategy), then waits to be
# killed together with torch's shared-memory manager.
SHARER = """
import sys, torch
torch.multiprocessing.set_sharing_strategy("file_system")
tensor = torch.zeros(1 << 16)
tensor.share_memory_()
print("shared", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_still_needed_a_killed_process_group_leaves_its_batch_files():
    proc = subprocess.Popen(
        [sys.executable, "-c", SHARER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "shared"
        mine = [n for n in os.listdir("/dev/shm") if n.startswith(f"torch_{proc.pid}_")]
        assert mine, "torch no longer names its files torch_<pid>_...: revise " + PATCH.module
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process and torch's manager, as a preemption
        proc.wait()
    left = [n for n in mine if os.path.exists(os.path.join("/dev/shm", n))]
    try:
        if not left:
            pytest.fail(f"upstream changed: torch unlinks the files itself; delete {PATCH.module}")
    finally:
        removed = remove_orphans()
    assert set(left) <= set(removed)
