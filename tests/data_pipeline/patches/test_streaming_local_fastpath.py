"""patches/streaming_local_fastpath.py: over shards on disk, no per-sample bookkeeping."""

from __future__ import annotations

import pytest
from streaming import StreamingDataset

from data_pipeline.loader import build_loader
from data_pipeline.patches import guard
from data_pipeline.patches.streaming_local_fastpath import PATCH
from data_pipeline.streaming import build_dataset
from tests.data_pipeline.helpers import NUM_SAMPLES, epoch_ids, processor, write_shards


def test_version_in_tested_range():
    assert PATCH.version_problem() is None


def test_fingerprints_unchanged():
    assert PATCH.fingerprint_problems() == []


def _epoch_with_upstream_calls(tmp_path, monkeypatch, on: bool) -> tuple[list[int], int]:
    """One in-process epoch over local shards; returns its sample ids and how often streaming's
    own `prepare_shard` (which takes the cache FileLock) ran."""
    folder = str(tmp_path / "local")
    write_shards(folder)
    calls = []
    upstream = StreamingDataset.prepare_shard

    def counting(self, shard_id, blocking=True):  # noqa: ANN001, ANN202
        calls.append(shard_id)
        return upstream(self, shard_id, blocking)

    monkeypatch.setattr(StreamingDataset, "prepare_shard", counting)
    ds = build_dataset([folder], processor(), str(tmp_path / "c"), 4, shuffle=False,
                       clean_stale_shm=False)  # fmt: skip
    guard.set_decision(PATCH.name, on)
    try:
        ids = epoch_ids(build_loader(ds, 4, num_workers=0))
    finally:
        guard.set_decision(PATCH.name, True)
    return ids, len(calls)


def test_behaviour_same_epoch_without_streamings_per_sample_work(tmp_path, monkeypatch):
    ids, calls = _epoch_with_upstream_calls(tmp_path, monkeypatch, on=True)
    assert ids == list(range(NUM_SAMPLES))
    assert calls == 0


def test_still_needed_streaming_prepares_every_sample_of_local_shards(tmp_path, monkeypatch):
    ids, calls = _epoch_with_upstream_calls(tmp_path, monkeypatch, on=False)
    assert ids == list(range(NUM_SAMPLES))
    if calls < NUM_SAMPLES // 2:
        pytest.fail(
            f"upstream changed: {calls} prepare_shard calls for {NUM_SAMPLES} samples of local "
            f"shards; measure again and delete or revise {PATCH.module}"
        )
