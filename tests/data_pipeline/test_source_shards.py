"""Shards of a local source folder are checked against index.json before their first read, as
downloaded shards are: a corrupt one is a DataError naming it; each is hashed once per node."""

from __future__ import annotations

import json
import os

import pytest
from streaming import MDSWriter

from data_pipeline.errors import DataError
from data_pipeline.streaming import SourceShardChecks, build_dataset


def _write(folder: str) -> list[str]:
    with MDSWriter(
        out=folder, columns={"data": "bytes"}, hashes=["xxh64"], size_limit=1 << 12
    ) as w:
        for i in range(40):
            w.write({"data": bytes([i]) * 500})
    with open(os.path.join(folder, "index.json")) as f:
        return [os.path.join(folder, s["raw_data"]["basename"]) for s in json.load(f)["shards"]]


def _flip_keeping_size_and_time(path: str) -> None:
    stat = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(stat.st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _read_all(folder: str, cache: str) -> list[bytes]:
    ds = build_dataset([folder], None, cache, 4, shuffle=False, clean_stale_shm=False)
    return [ds.get_item(i)["data"] for i in range(ds.num_samples)]


def test_a_corrupt_local_shard_is_named(tmp_path):
    shards = _write(str(tmp_path / "src"))
    assert len(shards) > 2
    _flip_keeping_size_and_time(shards[1])
    with pytest.raises(DataError, match=f"shard {shards[1]} does not match its index.json"):
        _read_all(str(tmp_path / "src"), str(tmp_path / "cache"))


def test_each_shard_is_hashed_once_per_cache_while_size_and_time_stay(tmp_path):
    shards = _write(str(tmp_path / "src"))
    _read_all(str(tmp_path / "src"), str(tmp_path / "cache"))  # checked, markers written
    _flip_keeping_size_and_time(shards[1])
    # Another process of the node (a later epoch's worker, a restart) trusts the marker; a node
    # with its own cache hashes again.
    SourceShardChecks._matched.clear()  # as in a new process
    _read_all(str(tmp_path / "src"), str(tmp_path / "cache"))
    with pytest.raises(DataError, match=f"shard {shards[1]} does not match"):
        _read_all(str(tmp_path / "src"), str(tmp_path / "other-cache"))
