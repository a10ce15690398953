"""patches/streaming_job_prefix.py: jobs starting together pick different shared-memory
prefixes; the ranks of one node pick the same."""

from __future__ import annotations

import subprocess
import sys

from data_pipeline.patches.streaming_job_prefix import PATCH, install, job_start


def test_version_in_tested_range():
    assert PATCH.version_problem() is None


def test_fingerprints_unchanged():
    assert PATCH.fingerprint_problems() == []


def _start(monkeypatch, port: str, rank: int) -> int:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    return job_start()


def test_behaviour_ranks_of_a_node_agree_and_jobs_and_nodes_differ(monkeypatch, tmp_path):
    node0 = _start(monkeypatch, "29500", 0)
    assert _start(monkeypatch, "29500", 1) == node0  # ranks 0 and 1: node 0
    assert _start(monkeypatch, "29500", 2) != node0  # node 1 of the job (own /dev/shm or not)
    assert _start(monkeypatch, "29501", 0) != node0  # another job
    assert node0 % 100 == 0 and node0 < 990000
    from streaming.base.constant import LOCALS
    from streaming.base.shared.prefix import _check_and_find

    assert install()
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "0")
    found = _check_and_find([str(tmp_path / "a")], [None], LOCALS)
    assert node0 <= found < node0 + 100


# Stock streaming: two jobs that look for a prefix before either has created its files (they
# start together) get the same one.
STOCK = """
from streaming.base.constant import LOCALS
from streaming.base.shared.prefix import _check_and_find
print(_check_and_find(["/job-a/cache"], ["s3://a"], LOCALS),
      _check_and_find(["/job-b/cache"], ["s3://b"], LOCALS))
"""


def test_still_needed_jobs_starting_together_pick_the_same_prefix():
    out = subprocess.run(
        [sys.executable, "-c", STOCK], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert len(out) == 2
    assert out[0] == out[1], f"upstream changed: jobs get their own prefixes; delete {PATCH.module}"
