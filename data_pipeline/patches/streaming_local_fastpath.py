"""Speed patch of mosaicml-streaming: over shards already on disk, a worker does no per-sample
bookkeeping beside reading its samples.

Streaming runs a download thread and a ready thread beside each worker's sample loop. Both walk
the epoch sample by sample (shared-memory reads, polls every 7 ms) even when every shard is on
disk, and the download thread takes the cache FileLock for every sample only to touch the shard's
access time; the sample loop also sleeps 7 ms at each epoch's start while the ready thread catches
up. `LocalFastPath` (a mixin of `SohoStreamingDataset`): when every shard of this worker's epoch
is on disk uncompressed and no cache limit can evict one, both threads mark the epoch ready and
exit at once, the sample loop does not sleep, and `prepare_shard` of a shard on disk only touches
its access time (as streaming's own `get_item` does). Anything else goes through streaming.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from time import time_ns
from typing import Any

import numpy as np

from data_pipeline.patches import guard
from data_pipeline.patches.guard import Patch

PATCH = Patch(
    module=__name__,
    library="mosaicml-streaming",
    tested=">=0.13.0,<0.14",
    kind="speed",
    relies_on={
        "streaming.base.dataset:StreamingDataset.prepare_shard": "a3f0ec4ae621397f",
        "streaming.base.dataset:StreamingDataset._prepare_thread": "75bd844a85d558b9",
        "streaming.base.dataset:StreamingDataset._ready_thread": "de9efb69412df3b3",
        "streaming.base.dataset:StreamingDataset._each_sample_id": "a0db10db05be0e7b",
        "streaming.base.dataset:_Iterator.__init__": "84c94d5d25742a8f",
        "streaming.base.dataset:_Iterator.on_exit": "46ec3d7a2446641a",
    },
    what="over shards on disk, streaming's per-sample download/ready threads end at once and "
    "the sample loop does not sleep at the epoch's start",
    buys="CPU demo/CI: ~190 us of worker CPU a sample from the threads and ~400 us from the "
    "lock (benchmarks/README.md, data_throughput); at the paper's 600x1000 images a JPEG decode "
    "takes ~10 ms a sample, so there it is below 1%",
)


def install() -> bool:
    return PATCH.install()


def supported() -> bool:
    return PATCH.supported()


class LocalFastPath:
    """Mixin for a StreamingDataset subclass that also has `ShardStateChecks`."""

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        if guard.is_on(PATCH.name) and self.raw_on_disk(shard_id):
            self._shard_access_times[shard_id] = time_ns()
            return
        super().prepare_shard(shard_id, blocking)

    def _epoch_shards_local(self, it: Any) -> bool:
        """Every shard this worker reads this epoch is on disk, uncompressed, and no cache limit
        can evict one. Decided once per epoch, by whichever of the worker's three threads comes
        first: the others must not decide otherwise a moment later (a shard just downloaded)."""
        if not guard.is_on(PATCH.name):
            return False
        with self.process_local().setdefault("epoch_check", threading.Lock()):
            if not hasattr(it, "soho_all_local"):
                ids = it.sample_ids[it.sample_ids >= 0]
                starts = self.sample_offset_per_shard
                shards = np.unique(np.searchsorted(starts, ids, side="right") - 1)
                it.soho_all_local = not self.cache_limit and all(
                    self.raw_on_disk(int(s)) for s in shards
                )
            return it.soho_all_local

    def _finish_at_once(self, it: Any, index: str) -> bool:
        """Over local shards: set the thread's `index` of `it` to the end and exit."""
        if not self._epoch_shards_local(it):
            return False
        setattr(it, index, it.total)
        it.on_exit()
        return True

    def _prepare_thread(self, it: Any) -> None:
        if not self._finish_at_once(it, "prepare_index"):
            super()._prepare_thread(it)

    def _ready_thread(self, it: Any) -> None:
        if not self._finish_at_once(it, "ready_index"):
            super()._ready_thread(it)

    def _each_sample_id(self, it: Any) -> Iterator[int]:
        if self._epoch_shards_local(it):
            it.prepare_index = it.ready_index = it.total
        return super()._each_sample_id(it)
