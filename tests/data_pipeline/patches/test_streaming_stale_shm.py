"""patches/streaming_stale_shm.py: stale streaming shared memory goes, a live job's stays."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from data_pipeline.patches.streaming_stale_shm import PATCH, remove_stale

# A live job: holds one file of its prefix open (as a dataset maps its shared state) until
# stdin closes.
HOLDER = "import sys; f = open(sys.argv[1], 'rb'); print('held', flush=True); sys.stdin.read()"


def _hold(path: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout.readline().strip() == b"held"
    return proc


def test_version_in_tested_range():
    assert PATCH.version_problem() is None


def test_fingerprints_unchanged():
    assert PATCH.fingerprint_problems() == []


def test_behaviour_removes_only_prefixes_no_live_process_uses(tmp_path):
    names = ["000000_locals", "000000_shard_states", "000001_locals", "000001_barrier"]
    for name in [*names, "000002_other", "torch_1_2_3"]:
        (tmp_path / name).write_bytes(b"\0" * 8)
    holder = _hold(str(tmp_path / "000000_locals"))  # a live job's prefix
    try:
        removed = remove_stale(str(tmp_path))
    finally:
        holder.communicate(b"")
    assert sorted(removed) == [str(tmp_path / "000001_barrier"), str(tmp_path / "000001_locals")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000000_locals",
        "000000_shard_states",  # unused itself, but its prefix is live
        "000002_other",
        "torch_1_2_3",
    ]
    assert remove_stale(str(tmp_path)) == [
        str(tmp_path / n) for n in ("000000_locals", "000000_shard_states")
    ]  # the job has ended


# In a private /dev/shm: streaming's own clean-up unlinks a live job's files.
STREAMING_CLEANUP = f"""
import os, subprocess, sys
from streaming.base.util import clean_stale_shared_memory
open("/dev/shm/000000_locals", "wb").write(bytes(64))
holder = subprocess.Popen([sys.executable, "-c", {HOLDER!r}, "/dev/shm/000000_locals"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
holder.stdout.readline()
clean_stale_shared_memory()
print("live file removed" if not os.path.exists("/dev/shm/000000_locals") else "kept")
holder.communicate(b"")
"""


def test_still_needed_streaming_cleanup_removes_a_live_jobs_files():
    unshare = shutil.which("unshare")
    command = "mount -t tmpfs none /dev/shm && exec " + sys.executable + ' -c "$0"'
    if unshare is None:
        pytest.skip("needs unshare for a private /dev/shm")
    result = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", command, STREAMING_CLEANUP],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0 and "Operation not permitted" in result.stderr:
        pytest.skip("not allowed to make a private /dev/shm here")
    assert result.returncode == 0, result.stderr[-3000:]
    if "kept" in result.stdout:
        pytest.fail(f"upstream changed: streaming spares live files; delete {PATCH.module}")
    assert "live file removed" in result.stdout
