"""What a shard folder's `index.json` must be before anything acts on it.

The index comes from storage, and a hostile or damaged one is read by several hands: the shard
checks join its basenames to the remote and to the local cache (a `../` would reach outside it,
and the cache purge deletes files there), `data ls` and `plan` add up its counts, and streaming
allocates arrays by its sample counts (10**12 samples would ask for 7 TiB) and passes each shard
entry's keys to its reader as arguments (a missing or unknown key fails it). `index_problem` says
in one line what is wrong, so that every reader refuses the same indexes with the same words.
"""

from __future__ import annotations

from typing import Any

from data_pipeline.errors import shown

# An MDS shard starts with its sample count and one 4-byte offset per sample and one more; the
# offsets are uint32, so a shard's uncompressed size is under 4 GiB.
_MDS_BYTES_PER_SAMPLE = 4
_MDS_MAX_BYTES = 2**32
_MAX_BASENAME = 1024
# What streaming's MDS reader takes from each shard entry (`MDSReader.from_json` passes the entry's
# keys as arguments, so a missing or unknown key fails when a run opens the dataset),
# the compressions it decompresses (algorithm and the levels after `:`) and the keys of a file's
# entry (`FileInfo`). tests/data_pipeline/test_mds_index.py compares them with the installed
# streaming's.
SHARD_KEYS = frozenset(
    ("version", "format", "column_encodings", "column_names", "column_sizes", "compression")
    + ("hashes", "raw_data", "samples", "size_limit", "zip_data")
)
FILE_KEYS = frozenset(("basename", "bytes", "hashes"))
COMPRESSION_LEVELS = {
    "br": range(12),
    "bz2": range(1, 10),
    "gz": range(10),
    "snappy": range(0),
    "zstd": range(1, 23),
}


def _count(value: Any, below: int | None = None) -> bool:
    return type(value) is int and value >= 0 and (below is None or value < below)


def _file_problem(info: Any, below: int | None) -> str | None:
    """What is wrong with a shard's `raw_data` / `zip_data` entry, or None."""
    if not isinstance(info, dict):
        return f"expected a mapping with basename and bytes, got {shown(info)}"
    if set(info) != FILE_KEYS:
        return f"keys {shown(sorted(info))}, expected {shown(sorted(FILE_KEYS))}"
    name = info.get("basename")
    parts = name.split("/") if isinstance(name, str) and len(name) <= _MAX_BASENAME else [""]
    odd = any(not char.isprintable() or char == "\\" for char in "".join(parts))
    if odd or any(part in ("", ".", "..") for part in parts):
        return f"basename {shown(name)} is not a file inside the shard folder"
    if not _count(info.get("bytes"), below):
        return f"bytes {shown(info.get('bytes'))} is not a shard's size"
    hashes = info["hashes"]
    if not isinstance(hashes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in hashes.items()
    ):
        return f"hashes {shown(hashes)} is not a mapping of algorithm to digest"
    return None


def is_compression(name: Any) -> bool:
    """Whether streaming decompresses shards written with `name` (`zstd`, `zstd:7`, ...)."""
    if not isinstance(name, str):
        return False
    algorithm, colon, level = name.partition(":")
    levels = COMPRESSION_LEVELS.get(algorithm)
    if levels is None or not colon:
        return levels is not None
    return level.isascii() and level.isdigit() and str(int(level)) == level and int(level) in levels


def _shard_problem(shard: dict[str, Any]) -> str | None:
    """What is wrong with a shard entry's keys, version, compression and size limit, or None."""
    if set(shard) != SHARD_KEYS:
        missing, unknown = sorted(SHARD_KEYS - set(shard)), sorted(set(shard) - SHARD_KEYS)
        return f"missing keys {shown(missing)}" if missing else f"unknown keys {shown(unknown)}"
    if shard["version"] != 2:
        return f"version {shown(shard['version'])} (2 expected)"
    compression = shard["compression"]
    if shard["zip_data"] and not is_compression(compression):
        return f"compression {shown(compression)} is none streaming decompresses"
    if compression is not None and not isinstance(compression, str):
        return f"compression {shown(compression)} is no name"
    hashes = shard["hashes"]
    if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
        return f"hashes {shown(hashes)} is not a list of algorithms"
    limit = shard["size_limit"]
    if not (limit is None or _count(limit) or isinstance(limit, str)):
        return f"size_limit {shown(limit)} is not a size"
    return None


def index_problem(index: Any) -> str | None:
    """Why `index` (a parsed `index.json`) is no MDS index this pipeline reads, or None."""
    if not isinstance(index, dict) or index.get("version") != 2:
        return "not an MDS index (version 2 expected)"
    if not isinstance(index.get("shards"), list):
        return "not an MDS index ('shards' is no list)"
    for n, shard in enumerate(index["shards"]):
        where = f"shards[{n}]"
        if not isinstance(shard, dict) or shard.get("format") != "mds":
            return f"{where}: not an MDS shard (format 'mds' expected)"
        why = _shard_problem(shard)
        if why:
            return f"{where}: {why}"
        columns = [shard[k] for k in ("column_names", "column_encodings", "column_sizes")]
        if not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) != 1:
            return f"{where}: column_names, column_encodings and column_sizes differ in length"
        names, encodings, sizes = columns
        if not all(isinstance(c, str) for c in names + encodings) or not all(
            size is None or _count(size) for size in sizes
        ):
            return f"{where}: column names and encodings are not all text, or sizes not counts"
        for key in ("raw_data", "zip_data"):
            if key == "zip_data" and not shard[key]:
                continue  # uncompressed (streaming reads any empty value so)
            why = _file_problem(shard[key], _MDS_MAX_BYTES if key == "raw_data" else None)
            if why:
                return f"{where}.{key}: {why}"
        samples, size = shard["samples"], shard["raw_data"]["bytes"]
        if not _count(samples):
            return f"{where}: samples {shown(samples)} is not a count"
        if samples * _MDS_BYTES_PER_SAMPLE > size:
            return f"{where}: {shown(samples)} samples do not fit in its {size} bytes"
    return None
