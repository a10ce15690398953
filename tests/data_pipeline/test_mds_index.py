"""The index check's picture of streaming's MDS reader is the installed streaming's: the shard
keys its reader takes, the file entry's keys and the compressions it decompresses."""

from __future__ import annotations

import dataclasses
import inspect

from streaming.base.compression import get_compressions, is_compression
from streaming.base.format.base.reader import FileInfo
from streaming.base.format.mds.reader import MDSReader

from data_pipeline import mds_index


def test_shard_keys_are_the_arguments_of_streamings_mds_reader():
    taken = set(inspect.signature(MDSReader.__init__).parameters) - {"self", "dirname", "split"}
    # from_json takes `version` and `format` out of the entry before it calls the reader
    assert mds_index.SHARD_KEYS == taken | {"version", "format"}
    assert mds_index.FILE_KEYS == {field.name for field in dataclasses.fields(FileInfo)}


def test_compressions_are_the_ones_streaming_decompresses():
    listed = {
        name if level is None else f"{name}:{level}"
        for name, levels in mds_index.COMPRESSION_LEVELS.items()
        for level in [None, *levels]
    }
    assert listed == get_compressions()
    odd = ["zstd:007", "zstd:99", "zstd:", "snappy:1", "lz4", "ZSTD", "zstd:٣", ":3", "", None, 7]
    for name in sorted(get_compressions()) + odd:
        assert mds_index.is_compression(name) == (isinstance(name, str) and is_compression(name))
