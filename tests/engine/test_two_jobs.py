"""Two jobs on one machine: each 2-rank `soho-scale train` cleans stale shared memory when it
builds its data, and must never remove the files of the other, live job (streaming's shard
states, barrier and epoch files in /dev/shm)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

import pytest
import torch

from tests.engine.conftest import kill_group, record, run_train, start_train, wait_for_steps

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 9  # three epochs of 48 samples: the first job starts new loader workers twice after the
# second job has built its data


def _losses(run_dir: str) -> list[list[float]]:
    return [record(run_dir, rank, 0)["losses"] for rank in (0, 1)]


def test_two_concurrent_jobs_train_as_each_does_alone(make_job, tmp_path):
    job = make_job("shared", schedule__steps=STEPS)
    solo = str(tmp_path / "solo")
    result = run_train(job, solo, 2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    job_second = make_job("second", schedule__steps=STEPS)  # its own checkpoint folder
    # Each job its own temporary folder, as schedulers give them: streaming's file locks there
    # do not tell one job's shared-memory prefix from the other's, only /dev/shm does.
    tmpdirs = [tempfile.mkdtemp(prefix="job-") for _ in range(2)]  # short: socket paths
    proc = start_train(
        make_job("first", schedule__steps=STEPS), first, 2, env={"TMPDIR": tmpdirs[0]}
    )
    try:
        # The second job builds its data (and cleans stale shared memory) while the first one
        # trains its first epoch.
        wait_for_steps(first, 1)
        result = run_train(job_second, second, 2, env={"TMPDIR": tmpdirs[1]})
        assert proc.wait(timeout=300) == 0, open(f"{first}.log").read()[-6000:]
    except (AssertionError, subprocess.TimeoutExpired):
        kill_group(proc)
        raise
    finally:
        for folder in tmpdirs:
            shutil.rmtree(folder, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    alone = _losses(solo)
    assert len(alone[0]) == STEPS
    for run in (first, second):
        for rank in (0, 1):
            torch.testing.assert_close(_losses(run)[rank], alone[rank], rtol=1e-6, atol=1e-6)
