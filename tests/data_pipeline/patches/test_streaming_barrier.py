"""patches/streaming_barrier.py: streaming's worker barrier with flock and 1 ms polls."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
from filelock import FileLock
from streaming.base import constant
from streaming.base.shared.barrier import SharedBarrier

from data_pipeline.patches.streaming_barrier import PATCH, PollingBarrier


def test_version_in_tested_range():
    assert PATCH.version_problem() is None


def test_fingerprints_unchanged():
    assert PATCH.fingerprint_problems() == []


def _barrier_rounds(barrier, arrived, rounds, procs, late):
    for r in range(rounds):
        if r in late:
            time.sleep(0.05)
        with arrived.get_lock():
            arrived.value += 1
        barrier(procs)
        if arrived.value < (r + 1) * procs:  # someone got through before all had arrived
            raise SystemExit(1)


def test_behaviour_holds_every_process_until_all_arrive(tmp_path):
    # The loader's workers meet at this barrier three times each epoch (streaming's protocol,
    # our lock and polling); a process that passes early would read a partition not yet shared.
    procs, rounds = 3, 25
    barrier = PollingBarrier(str(tmp_path / "lock"), f"soho_test_{os.getpid()}")
    barrier(1)  # the parent opens its lock file first: forked copies must open their own
    ctx = multiprocessing.get_context("fork")
    arrived = ctx.Value("i", 0)
    workers = [
        ctx.Process(target=_barrier_rounds, args=(barrier, arrived, rounds, procs, {i, 7 + i}))
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0] * procs
    assert arrived.value == procs * rounds


def test_still_needed_streaming_locks_with_a_filelock_and_polls_every_tick(tmp_path):
    barrier = SharedBarrier(str(tmp_path / "lock"), f"soho_up_{os.getpid()}")
    if not isinstance(barrier.lock, FileLock) or constant.TICK < 0.005:
        pytest.fail(
            f"upstream changed: SharedBarrier locks with {type(barrier.lock).__name__} and "
            f"polls every {constant.TICK * 1000:.0f} ms; measure again, delete {PATCH.module}"
        )
