"""patches/streaming_mapped_shards.py: shards on local disk read through memory mappings."""

from __future__ import annotations

import pickle
import sys

import pytest
from streaming import MDSWriter, StreamingDataset

from data_pipeline.patches import guard, streaming_mapped_shards
from data_pipeline.patches.streaming_mapped_shards import PATCH
from data_pipeline.streaming import build_dataset
from tests.data_pipeline.helpers import jpeg

COLUMNS = {"image": "bytes", "label": "int", "score": "float32", "captions": "json", "note": "str"}


def test_version_in_tested_range():
    assert PATCH.version_problem() is None


def test_fingerprints_unchanged():
    assert PATCH.fingerprint_problems() == []


def _mixed_shards(folder: str, n: int = 12) -> None:
    with MDSWriter(out=folder, columns=COLUMNS, size_limit=2000) as writer:
        for i in range(n):
            writer.write({"image": jpeg(i), "label": i - 5, "score": i / 4, "captions": [f"c {i}"],
                          "note": "é" * (i % 3)})  # fmt: skip


def test_behaviour_reads_every_column_as_streaming_decodes_it(tmp_path, monkeypatch):
    # Every column type, fixed-size ones too, decodes the same through the mapping; at most
    # MAX_MAPPED shards stay mapped, the least recently read unmapped first.
    monkeypatch.setattr(streaming_mapped_shards, "MAX_MAPPED", 2)
    folder = str(tmp_path / "mixed")
    _mixed_shards(folder)
    plain = StreamingDataset(local=folder, shuffle=False, batch_size=4)
    ds = build_dataset([folder], None, str(tmp_path / "cache"), 4, shuffle=False,
                       clean_stale_shm=False)  # fmt: skip
    assert guard.is_on(PATCH.name)
    mapped = ds.process_local().setdefault("mapped", {})
    assert ds.num_shards >= 4
    for i in range(ds.num_samples):
        assert {**plain[i], "sample_id": i} == ds[i]
        assert 1 <= len(mapped) <= 2
    last = ds.num_shards - 1
    assert list(mapped) == [last - 1, last]
    first_of = ds.sample_offset_per_shard.tolist()
    ds[first_of[last - 1]]  # read again: now the most recently read ...
    ds[first_of[0]]  # ... so this one unmaps the other
    assert list(mapped) == [last - 1, 0]
    copy = pickle.loads(pickle.dumps(ds))  # as for spawned workers: mappings stay behind
    assert copy.process_local() == {} and copy[3] == ds[3]


_opened: list[str] = []


def _count_opens(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], str) and args[0].endswith(".mds"):
        _opened.append(args[0])


def test_still_needed_streaming_opens_the_shard_file_for_every_sample(tmp_path):
    folder = str(tmp_path / "mixed")
    _mixed_shards(folder)
    ds = build_dataset([folder], None, str(tmp_path / "cache"), 4, shuffle=False,
                       clean_stale_shm=False)  # fmt: skip
    sys.addaudithook(_count_opens)  # (audit hooks cannot be removed; this one only counts)
    try:
        guard.set_decision(PATCH.name, False)
        _opened.clear()
        for i in range(ds.num_samples):
            ds[i]
        upstream = len(_opened)
        guard.set_decision(PATCH.name, True)
        _opened.clear()
        for i in range(ds.num_samples):
            ds[i]
        ours = len(_opened)
    finally:
        guard.set_decision(PATCH.name, True)
    if upstream < ds.num_samples:
        pytest.fail(
            f"upstream changed: streaming opened shard files {upstream} times for "
            f"{ds.num_samples} samples; measure again and delete or revise {PATCH.module}"
        )
    assert ours <= ds.num_shards  # once per shard, for its mapping
