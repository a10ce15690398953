"""Speed patch of mosaicml-streaming: MDS shards on local disk are read through a memory mapping
with coders built once per column layout.

Streaming's `MDSReader.get_item` opens the shard file for every sample (open, two seeks and
reads, close) and builds a coder object per column per sample: ~23 us a sample against ~9 us
for reading a JPEG file. `MappedShards` (a mixin of `SohoStreamingDataset`) slices the sample
out of a mapping and decodes it with the same coders: ~5 us. At most `MAX_MAPPED` shards stay
mapped per process (least recently read unmapped first); a mapping holds no file descriptor.
Compressed shards, unknown encodings and datasets with a cache limit go through streaming.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

from streaming.base.format.mds.encodings import _get_coder
from streaming.base.format.mds.reader import MDSReader

from data_pipeline.patches import guard
from data_pipeline.patches.guard import Patch

PATCH = Patch(
    module=__name__,
    library="mosaicml-streaming",
    tested=">=0.13.0,<0.14",
    kind="speed",
    relies_on={
        "streaming.base.format.mds.reader:MDSReader.get_sample_data": "bc21d65b3188d116",
        "streaming.base.format.mds.reader:MDSReader.decode_sample": "9f53889702dcf2a6",
        "streaming.base.format.mds.encodings:_get_coder": "c712e347950e3eb4",
        "streaming.base.dataset:StreamingDataset.get_item": "ea0ce74764555694",
    },
    what="uncompressed MDS shards on disk are read through a memory mapping, coders built once",
    buys="CPU demo/CI: 5 us a sample in one process where streaming takes 23 "
    "(benchmarks/README.md); at the "
    "paper's 600x1000 images a JPEG decode takes ~10 ms a sample, so there it is below 0.2%",
)
MAX_MAPPED = 1024


def install() -> bool:
    return PATCH.install()


def supported() -> bool:
    return PATCH.supported()


class MappedShard:
    """One uncompressed MDS shard file on local disk, mapped into memory for reading."""

    def __init__(self, shard: MDSReader, layout: tuple[list, struct.Struct]) -> None:
        path = os.path.join(shard.dirname, shard.split or "", shard.raw_data.basename)
        with open(path, "rb") as f:
            self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.columns, self.sizes = layout

    @staticmethod
    def layout(shard: MDSReader) -> tuple[list, struct.Struct] | None:
        """(name, fixed size or 0, coder) per column and the struct of the sizes that start a
        sample (uint32 per variable-size column); None for an encoding streaming does not know."""
        columns = [
            (name, size, _get_coder(encoding))
            for name, size, encoding in zip(
                shard.column_names, shard.column_sizes, shard.column_encodings
            )
        ]
        if any(coder is None for _, _, coder in columns):
            return None
        variable = sum(1 for _, size, _ in columns if not size)
        return columns, struct.Struct(f"<{variable}I")

    def get_item(self, index: int) -> dict[str, Any]:
        begin, end = struct.unpack_from("<II", self.data, 4 + 4 * index)
        sizes = iter(self.sizes.unpack_from(self.data, begin))
        position = begin + self.sizes.size
        sample = {}
        for name, size, coder in self.columns:
            size = size or next(sizes)
            sample[name] = coder.decode(self.data[position : position + size])
            position += size
        return sample

    def close(self) -> None:
        self.data.close()


class MappedShards:
    """Mixin for a StreamingDataset subclass that also has `ShardStateChecks`."""

    def _mapped(self, shard_id: int) -> MappedShard | None:
        """The shard mapped for reading, when it is an MDS shard uncompressed on disk that no
        cache limit can evict; None sends the read through streaming."""
        local = self.process_local()
        mapped: dict[int, MappedShard] = local.setdefault("mapped", {})  # LRU order
        layouts: dict[tuple, Any] = local.setdefault("layouts", {})
        shard = mapped.pop(shard_id, None)
        if shard is None:
            reader = self.shards[shard_id]
            if self.cache_limit or type(reader) is not MDSReader or not self.raw_on_disk(shard_id):
                return None
            key = (tuple(reader.column_names), tuple(reader.column_encodings),
                   tuple(reader.column_sizes))  # fmt: skip
            if key not in layouts:
                layouts[key] = MappedShard.layout(reader)
            if layouts[key] is None:
                return None
            if len(mapped) >= MAX_MAPPED:
                mapped.pop(next(iter(mapped))).close()
            shard = MappedShard(reader, layouts[key])
        mapped[shard_id] = shard  # most recently read last
        return shard

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        if guard.is_on(PATCH.name):
            shard_id, index = self.spanner[sample_id]
            shard = self._mapped(shard_id)
            if shard is not None:
                return shard.get_item(index)
        return super().get_item(sample_id, retry)
