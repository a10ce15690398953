"""Correctness patch of mosaicml-streaming: a shard that fails ends the epoch with an error naming
it, on every worker and rank of the node, instead of a short epoch or a hang.

Upstream defects (DESIGN.md, "Verified pitfalls"; `tests/data_pipeline/patches/
test_streaming_shard_state.py` shows each one still there):
- a download that raises leaves the shard PREPARING in the node's shared state forever: every
  other worker waiting for it hangs;
- an error in the download or ready thread is re-raised inside a future's callback, where it is
  only logged: the epoch ends early with no error;
- nothing tells the dataset how many samples this worker's epoch was to yield, nor which epoch it
  is inside a worker (the caption choice and MLM masking depend on it).

`ShardStateChecks` (first base of `SohoStreamingDataset`) marks a failed shard FAILED (a state
streaming does not use) in that shared array, keeps background errors for `__iter__` to raise,
records the planned sample count and the epoch, and stops this worker's threads when any worker
marks a shard failed. Delete it when streaming raises download errors in the iterating thread and
marks failed shards itself.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.patches.guard import Patch

PATCH = Patch(
    module=__name__,
    library="mosaicml-streaming",
    tested=">=0.13.0,<0.14",
    kind="correctness",
    relies_on={
        "streaming.base.dataset:_ShardState": "23eff53dfa086393",
        "streaming.base.dataset:StreamingDataset.prepare_shard": "a3f0ec4ae621397f",
        "streaming.base.dataset:StreamingDataset.on_exception": "28b662af182b5554",
        "streaming.base.dataset:StreamingDataset._resume_incr_epoch": "1271575f1c558ba1",
        "streaming.base.dataset:StreamingDataset._get_work": "2713ef49d34db72e",
        "streaming.base.dataset:StreamingDataset.__iter__": "227ef6422efcb93a",
        "streaming.base.dataset:_Iterator.on_exit": "46ec3d7a2446641a",
    },
    what="failed shards are marked in streaming's shared shard states and raised by every "
    "worker; background errors and short epochs become DataError",
)

# Streaming's own states are 0-3; this one is ours: the shard failed to download or verify.
FAILED = 200
_WATCH_S = 0.2  # how often a worker looks for shards another worker marked failed


def install() -> bool:
    return PATCH.install()


@functools.cache
def _states() -> Any:
    """Streaming's shard states, imported when first needed: the guard checks this patch (in
    `soho-scale train`'s parent, before anything starts) without importing streaming."""
    from streaming.base.dataset import _ShardState

    return _ShardState


def supported() -> bool:
    return PATCH.supported()


class ShardStateChecks:
    """Mixin for a StreamingDataset subclass that defines `shard_url(shard_id)`."""

    def state_of(self, shard_id: int) -> str:
        """'remote', 'preparing', 'local' or 'failed'."""
        state = int(self._shard_states[shard_id])
        return "failed" if state == FAILED else _states()(state).name.lower()

    def raw_on_disk(self, shard_id: int) -> bool:
        """The shard is LOCAL and its uncompressed files exist (streaming also calls a shard
        LOCAL when only its compressed file is there, and decompresses it when it is read).
        Without a cache limit nothing deletes it again, so the answer is kept."""
        raw = self.process_local().setdefault("raw_shards", set())
        if shard_id in raw:
            return True
        if self._shard_states[shard_id] != _states().LOCAL:
            return False
        shard = self.shards[shard_id]
        folder = os.path.join(shard.dirname, shard.split or "")
        if all(os.path.isfile(os.path.join(folder, r.basename)) for r, _ in shard.file_pairs):
            if not self.cache_limit:
                raw.add(shard_id)
            return True
        return False

    def stuck_shards(self) -> list[int]:
        """Shards a download is working on, or that failed: what a stalled loader waits for."""
        states = self._shard_states.numpy()
        return [
            int(i) for i in np.flatnonzero((states == _states().PREPARING) | (states == FAILED))
        ]

    def mark_failed(self, shard_id: int) -> None:
        """The other workers of the node stop waiting and raise too."""
        self._shard_states[shard_id] = FAILED

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as e:
            self.mark_failed(shard_id)
            raise DataError(
                f"shard {self.shard_url(shard_id)} could not be fetched or failed its hash "
                f"check ({type(e).__name__}: {e}); check the dataset location, or rewrite it"
            ) from e

    def on_exception(self, future: Future) -> None:
        error = future.exception()
        if error is not None:
            self.process_local()["background_error"] = error
            self._event.set()
            # The failed thread skipped its exit bookkeeping; without this the end of
            # StreamingDataset.__iter__ waits for it forever.
            self._iterator.on_exit()

    def _resume_incr_epoch(self) -> tuple[int, int]:
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self.epoch = epoch
        return epoch, sample_in_epoch

    def _get_work(self, epoch: int, sample_in_epoch: int) -> np.ndarray:
        sample_ids = super()._get_work(epoch, sample_in_epoch)
        self.process_local()["planned"] = int((sample_ids != -1).sum())
        return sample_ids

    def __iter__(self) -> Iterator[dict[str, Any]]:
        local = self.process_local()
        local["background_error"] = None
        local["planned"] = 0
        if not hasattr(self, "_event"):  # streaming creates it in its first __iter__
            self._event = threading.Event()
        done = threading.Event()
        failed: list[int] = []
        watcher = threading.Thread(target=self._watch, args=(done, failed), daemon=True)
        watcher.start()
        yielded = 0
        try:
            for sample in super().__iter__():
                yielded += 1
                yield sample
        finally:
            done.set()
        error = local["background_error"]
        if error is not None:
            raise error if isinstance(error, DataError) else DataError(str(error)) from error
        if failed:
            raise DataError(
                f"shard {self.shard_url(failed[0])} could not be fetched or failed its hash "
                "check in another worker; see the first error, check the dataset location"
            )
        if yielded < local["planned"]:
            raise DataError(
                f"epoch ended after {yielded} of {local['planned']} samples of this worker: a "
                f"shard of {', '.join(s.remote or s.local for s in self.streams)} is missing"
            )

    def _watch(self, done: threading.Event, failed: list[int]) -> None:
        """Stop this worker's streaming threads when any worker marks a shard failed."""
        while not done.wait(_WATCH_S):
            bad = np.flatnonzero(self._shard_states.numpy() == FAILED)
            if len(bad):
                failed.append(int(bad[0]))
                self._event.set()
                return
