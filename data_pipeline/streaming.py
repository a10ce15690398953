"""Streaming datasets and the loader: MDS shards (local or s3://) -> batches for every task.

`SohoStreamingDataset` is a mosaicml-streaming `StreamingDataset` that turns raw MDS samples into
tensors (decode, resize, tokenize, MLM-mask) and adds what streaming leaves out (DESIGN.md):

- a missing, truncated or altered shard raises `DataError` naming the shard and URL (streaming
  itself ends the epoch early in-process, or hangs with workers): remote sizes are checked
  against `index.json` before the first epoch, download failures are re-raised with the shard
  name, and an epoch that yields fewer samples than planned is an error;
- cached shards whose hash is known are re-validated (and purged if corrupt) before reuse;
- an image that fails to decode is replaced by a blank image (`sample_valid` False) and counted,
  never dropped, so all ranks keep the same number of batches.

`build_loader` returns a `SohoLoader` (a `StreamingDataLoader`): `state_dict()` /
`load_state_dict()` resume mid-epoch exactly once, also on another number of ranks when the
global batch and `num_canonical_nodes` stay fixed; a stalled worker becomes a `DataError` naming
the shards still downloading after `stall_timeout_s`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import mmap
import os
import random
import struct
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from threading import Event, Lock, Thread
from time import sleep, time_ns
from typing import Any

import numpy as np
import torch
from streaming import Stream, StreamingDataLoader, StreamingDataset
from streaming.base.dataset import _ShardState  # the shard states streaming keeps in shm
from streaming.base.format.mds.encodings import _get_coder
from streaming.base.format.mds.reader import MDSReader
from streaming.base.hashing import get_hash
from streaming.base.shared.barrier import SharedBarrier
from streaming.base.util import clean_stale_shared_memory
from streaming.base.world import World

from data_pipeline.collate import COLLATE_BY_TASK
from data_pipeline.masking import mask_captions
from data_pipeline.storage import (
    INDEX_BASENAME,
    DataError,
    join_url,
    object_sizes,
    read_index,
    s3_client,
    shard_files,
)
from data_pipeline.transforms import ImageDecodeError, ImageTransform, TextTransform

logger = logging.getLogger(__name__)

TASKS = tuple(COLLATE_BY_TASK)
_PREPARING = _ShardState.PREPARING
_LOCAL = _ShardState.LOCAL
_LOCK_POLL_S = 0.001
# Shard files each worker keeps mapped for reading (least recently read unmapped first). A
# mapping holds no file descriptor, only address space and the kernel's page cache.
_MAX_OPEN_SHARDS = 1024
# Our own shard state (streaming uses 0-3): a shard that failed to download or verify. It lives
# in streaming's shared-memory state array, so every worker and rank of the node sees it.
_FAILED = 200
# Batches each DataLoader worker keeps ready (plan.py sizes /dev/shm from it).
PREFETCH_FACTOR = 4


@dataclass(frozen=True)
class StreamSource:
    """One shard folder (local path or s3:// URL) and its share of each epoch."""

    remote: str
    proportion: float | None = None


@dataclass
class SampleProcessor:
    """Raw MDS sample -> tensors for one task (runs in the DataLoader workers)."""

    task: str
    image: ImageTransform = field(default_factory=ImageTransform)
    text: TextTransform = field(default_factory=TextTransform)
    captions_per_image: int = 4
    mlm_probability: float = 0.15
    seed: int = 0
    num_answers: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DataError(f"task {self.task!r}: unknown, use one of {', '.join(TASKS)}")

    def images(self, raw: dict[str, Any], columns: Sequence[str]) -> tuple[list, bool]:
        try:
            return [self.image(raw[c]) for c in columns], True
        except ImageDecodeError:
            side = self.image.square_size or self.image.min_size
            return [torch.zeros(3, side, side) for _ in columns], False

    def pick_captions(self, captions: list[str], epoch: int, sample_id: int) -> list[str]:
        """`captions_per_image` captions, a pure function of (seed, epoch, sample id)."""
        rng = random.Random(f"{self.seed}:{epoch}:{sample_id}:captions")
        order = rng.sample(range(len(captions)), len(captions))
        return [captions[order[i % len(order)]] for i in range(self.captions_per_image)]

    def __call__(self, raw: dict[str, Any], sample_id: int, epoch: int) -> dict[str, Any]:
        columns = ["image_left", "image_right"] if self.task == "nlvr2" else ["image"]
        images, valid = self.images(raw, columns)
        out: dict[str, Any] = {"sample_id": sample_id, "valid": valid}
        if self.task == "nlvr2":
            out["image_left"], out["image_right"] = images
        else:
            out["image"] = images[0]

        if self.task in ("pretrain", "retrieval"):
            texts = self.pick_captions(list(raw["captions"]), epoch, sample_id)
        elif self.task == "vqa":
            texts = [raw["question"]]
        elif self.task == "nlvr2":
            texts = [raw["sentence"]]
        else:
            texts = [raw["hypothesis"]]
        out["text_ids"], out["text_mask"] = self.text(texts)

        if self.task == "pretrain":
            special = self.text.special_ids()
            ids = out["text_ids"]
            is_special = (out["text_mask"] == 0) | (ids == special["cls"]) | (ids == special["sep"])
            out["text_ids"], out["mlm_labels"] = mask_captions(
                ids,
                is_special,
                self.seed,
                epoch,
                sample_id,
                special["mask"],
                special["vocab_size"],
                self.mlm_probability,
            )
        elif self.task == "vqa":
            targets = torch.zeros(self.num_answers)
            for label, score in zip(raw["answer_labels"], raw["answer_scores"]):
                targets[label] = score
            out["targets"] = targets
            out["question_id"] = int(raw["question_id"])
        if self.task in ("nlvr2", "snli_ve"):
            out["label"] = int(raw["label"])
        return out


class _PollingBarrier(SharedBarrier):
    """Streaming's worker barrier (same shared state and protocol as `SharedBarrier.__call__`),
    locked with a plain `flock` and polling its shared state every millisecond.

    Each epoch's start passes it three times in every worker, four lock takes a pass. Streaming's
    own takes a FileLock (~0.3 ms a take here even when free; 50 ms polls when held) and polls
    the shared state every 7 ms: an epoch's start cost each worker ~8 ms alone and up to tens of
    ms waiting for the others (benchmarks/README.md); now ~2 ms.
    """

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if getattr(self, "_lock_pid", None) != os.getpid():  # a forked or unpickled copy
            self._lock_fd = os.open(self.filelock_path, os.O_RDWR | os.O_CREAT, 0o644)
            self._lock_pid = os.getpid()
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _wait(self, done: Any) -> None:
        while not done():
            sleep(_LOCK_POLL_S)

    def __call__(self, num_procs: int) -> None:
        with self._locked():
            if self.num_exit == -1:
                self.num_exit = num_procs
        with self._locked():
            first = not self.num_enter
        if first:  # the first to arrive waits for everyone to leave the last pass, then closes
            self._wait(lambda: self.num_exit == num_procs)
        with self._locked():
            if first:
                self.flag = False
            self.num_enter += 1
            if self.num_enter == num_procs:  # the last to arrive opens
                self.num_enter = 0
                self.num_exit = 0
                self.flag = True
        self._wait(lambda: self.flag)
        with self._locked():
            self.num_exit += 1
            if self.num_exit == num_procs:
                self.num_exit = -1


class _OpenShard:
    """An uncompressed MDS shard on local disk, mapped into memory for reading.

    Streaming's `MDSReader.get_item` opens the file for every sample (open, two seeks and reads,
    close) and builds a coder object per column per sample: ~23 us a sample here against ~9 us
    for reading a JPEG file. This slices the sample out of the mapping and decodes it with coders
    built once per column layout: ~5 us (benchmarks/README.md). Same bytes, same coders.
    """

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


class SohoStreamingDataset(StreamingDataset):
    """StreamingDataset returning processed samples with their dataset index (`sample_id`)."""

    def __init__(
        self,
        streams: Sequence[Stream],
        processor: SampleProcessor | None,
        verify_shards: bool = True,
        **kwargs: Any,
    ) -> None:
        self.processor = processor
        self.skipped = 0  # per worker process: samples replaced by a fallback
        self._epoch = 0
        self._planned = 0
        self._background_error: BaseException | None = None
        self._raw_shards: set[int] = set()  # shards seen uncompressed on disk (this process)
        self._open_shards: dict[int, _OpenShard] = {}  # this process's mapped shards, LRU order
        self._layouts: dict[tuple, Any] = {}  # column layout -> _OpenShard.layout
        if World.detect().is_local_leader:
            for stream in streams:
                if verify_shards:
                    client = (
                        s3_client(kwargs["download_timeout"], kwargs["download_retry"])
                        if stream.remote
                        else None
                    )
                    verify_remote_shards(stream.remote or stream.local, client)
                if stream.remote and stream.local:  # never purge a local-only source folder
                    purge_corrupt_cached_shards(stream.local)
        super().__init__(streams=list(streams), **kwargs)
        self._shared_barrier.__class__ = _PollingBarrier  # same shared state, faster polls

    def shard_url(self, shard_id: int) -> str:
        stream = self.streams[self.stream_per_shard[shard_id]]
        basename = shard_files_of(self.shards[shard_id])[0]
        return join_url(stream.remote or stream.local, basename)

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        # Streaming's download thread calls this for every sample and takes the cache FileLock
        # each time, even for a shard already on disk, where all it does is touch the access
        # time. That lock cost ~180 us a sample here (~10% of a worker's CPU per sample,
        # benchmarks/README.md); touch the time without it, as streaming's own get_item does.
        # (Only eviction under a cache_limit, which soho_scale does not set, takes a LOCAL
        # shard away, and get_item then fetches it again.)
        if self._raw_on_disk(shard_id):
            self._shard_access_times[shard_id] = time_ns()
            return
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as e:
            # Streaming leaves the shard "in progress" forever, which hangs the other workers;
            # mark it failed so they stop waiting and raise too.
            self._shard_states[shard_id] = _FAILED
            raise DataError(
                f"shard {self.shard_url(shard_id)} could not be fetched or failed its hash "
                f"check ({type(e).__name__}: {e}); check the dataset location, or rewrite it"
            ) from e

    def _raw_on_disk(self, shard_id: int) -> bool:
        """The shard is LOCAL and its uncompressed files exist. (Streaming also calls a shard
        LOCAL when only its compressed file is there, and decompresses it in prepare_shard.)"""
        if shard_id in self._raw_shards:
            return True
        if self._shard_states[shard_id] != _LOCAL:
            return False
        shard = self.shards[shard_id]
        folder = os.path.join(shard.dirname, shard.split or "")
        if all(os.path.isfile(os.path.join(folder, raw.basename)) for raw, _ in shard.file_pairs):
            self._raw_shards.add(shard_id)  # without a cache_limit nothing deletes it again
            return True
        return False

    def _epoch_shards_local(self, it: Any) -> bool:
        """Every shard this worker reads this epoch is on disk, uncompressed (and no cache limit
        can evict one). Decided once per epoch, by whichever of the worker's three threads comes
        first: the others must not decide otherwise a moment later (a shard just downloaded)."""
        with self._local_check:
            if not hasattr(it, "soho_all_local"):
                ids = it.sample_ids[it.sample_ids >= 0]
                starts = self.sample_offset_per_shard
                shards = np.unique(np.searchsorted(starts, ids, side="right") - 1)
                it.soho_all_local = not self.cache_limit and all(
                    self._raw_on_disk(int(s)) for s in shards
                )
            return it.soho_all_local

    # Streaming runs a download thread and a ready thread beside each worker's sample loop; both
    # walk the epoch sample by sample (shared-memory reads, a lock per sample) and poll every
    # 7 ms. With every shard of the epoch already on disk they have nothing to do but take CPU
    # and the GIL from the worker (~190 us a sample, 8% of a worker, benchmarks/README.md):
    # then they mark the epoch ready and exit at once.
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

    def on_exception(self, future: Future) -> None:
        # Streaming re-raises inside a future callback (the error is only logged) and the epoch
        # then ends early; keep it for __iter__ to raise.
        error = future.exception()
        if error is not None:
            self._background_error = error
            self._event.set()
            # The failed thread skipped its exit bookkeeping; without this the end of
            # StreamingDataset.__iter__ waits for it forever.
            self._iterator.on_exit()

    def _each_sample_id(self, it: Any) -> Iterator[int]:
        # Streaming's sample loop sleeps 7 ms whenever the ready thread is behind, which at each
        # epoch's start it always is, even when `_finish_at_once` is about to end it.
        if self._epoch_shards_local(it):
            it.prepare_index = it.ready_index = it.total
        return super()._each_sample_id(it)

    def _resume_incr_epoch(self) -> tuple[int, int]:
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._epoch = epoch
        return epoch, sample_in_epoch

    def _get_work(self, epoch: int, sample_in_epoch: int) -> np.ndarray:
        sample_ids = super()._get_work(epoch, sample_in_epoch)
        self._planned = int((sample_ids != -1).sum())
        return sample_ids

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._background_error = None
        self._planned = 0
        self._local_check = Lock()  # this epoch's threads decide `_epoch_shards_local` under it
        if not hasattr(self, "_event"):
            self._event = Event()
        done = Event()
        failed: list[int] = []
        watcher = Thread(target=self._watch_failed_shards, args=(done, failed), daemon=True)
        watcher.start()
        yielded = 0
        try:
            for sample in super().__iter__():
                yielded += 1
                yield sample
        finally:
            done.set()
        if self._background_error is not None:
            error = self._background_error
            raise error if isinstance(error, DataError) else DataError(str(error)) from error
        if failed:
            raise DataError(
                f"shard {self.shard_url(failed[0])} could not be fetched or failed its hash "
                "check in another worker; see the first error, check the dataset location"
            )
        if yielded < self._planned:
            raise DataError(
                f"epoch ended after {yielded} of {self._planned} samples of this worker: a "
                f"shard of {', '.join(s.remote or s.local for s in self.streams)} is missing"
            )

    def _watch_failed_shards(self, done: Event, failed: list[int]) -> None:
        """Stop this worker's streaming threads when any worker marks a shard failed."""
        while not done.wait(0.2):
            bad = np.flatnonzero(self._shard_states.numpy() == _FAILED)
            if len(bad):
                failed.append(int(bad[0]))
                self._event.set()
                return

    def __getstate__(self) -> dict[str, Any]:
        # Mappings, coders and locks do not pickle (spawned workers).
        return {**self.__dict__, "_open_shards": {}, "_layouts": {}, "_local_check": None}

    def _open_shard(self, shard_id: int) -> _OpenShard | None:
        """The shard mapped for reading, when it is an MDS shard uncompressed on disk that no
        cache limit can evict; None sends the read through streaming."""
        shard = self._open_shards.pop(shard_id, None)
        if shard is None:
            reader = self.shards[shard_id]
            if self.cache_limit or type(reader) is not MDSReader or not self._raw_on_disk(shard_id):
                return None
            key = (tuple(reader.column_names), tuple(reader.column_encodings),
                   tuple(reader.column_sizes))  # fmt: skip
            if key not in self._layouts:
                self._layouts[key] = _OpenShard.layout(reader)
            if self._layouts[key] is None:
                return None
            if len(self._open_shards) >= _MAX_OPEN_SHARDS:
                self._open_shards.pop(next(iter(self._open_shards))).close()
            shard = _OpenShard(reader, self._layouts[key])
        self._open_shards[shard_id] = shard  # most recently read last
        return shard

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        shard_id, index = self.spanner[sample_id]
        shard = self._open_shard(shard_id)
        raw = shard.get_item(index) if shard else super().get_item(sample_id, retry)
        if self.processor is None:
            return {**raw, "sample_id": sample_id}
        out = self.processor(raw, sample_id, self._epoch)
        if not out["valid"]:
            self.skipped += 1
            logger.warning(
                "sample %d (image_id %s) did not decode; blank fallback image used (%d so far)",
                sample_id,
                raw.get("image_id", raw.get("identifier", "?")),
                self.skipped,
            )
        return out


def shard_files_of(shard: Any) -> list[str]:
    """Basenames a streaming shard reader is stored as (compressed file when there is one)."""
    return [(zip_info or raw_info).basename for raw_info, zip_info in shard.file_pairs]


def verify_remote_shards(remote: str, client: Any = None) -> None:
    """Every shard listed in index.json exists with its listed size, or DataError naming it."""
    index = read_index(remote, client)
    sizes = object_sizes(remote, client)
    for info in shard_files(index):
        url = join_url(remote, info["basename"])
        if info["basename"] not in sizes:
            raise DataError(f"shard {url} is listed in {INDEX_BASENAME} but missing; rewrite it")
        if sizes[info["basename"]] != info["bytes"]:
            raise DataError(
                f"shard {url} has {sizes[info['basename']]} bytes, {INDEX_BASENAME} says "
                f"{info['bytes']}; the shard was altered or truncated, rewrite it"
            )


def purge_corrupt_cached_shards(local: str) -> list[str]:
    """Delete cached shard files that fail their size/hash in the cached index.json.

    Streaming validates a hash only right after download and reuses a corrupt cached file on
    restart; deleting it makes streaming download it again.
    """
    index_path = os.path.join(local, INDEX_BASENAME)
    if not os.path.isfile(index_path):
        return []
    with open(index_path) as f:
        index = json.load(f)
    purged = []
    for shard in index.get("shards", []):
        for key in ("raw_data", "zip_data"):
            info = shard.get(key)
            path = os.path.join(local, info["basename"]) if info else None
            if not path or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                data = f.read()
            algo = next((a for a in ("xxh64", "sha1") if a in info.get("hashes", {})), None)
            ok = len(data) == info["bytes"] and (
                algo is None or get_hash(algo, data) == info["hashes"][algo]
            )
            if not ok:
                logger.warning("cached shard %s is corrupt; deleting it to download again", path)
                os.remove(path)
                purged.append(path)
    return purged


def stream_cache_dir(cache_root: str, remote: str, position: int) -> str:
    """A cache folder unique to (run cache root, stream): ranks of a node agree on it."""
    digest = hashlib.sha1(remote.encode()).hexdigest()[:12]
    return os.path.join(cache_root, f"stream{position}-{digest}")


class WorkerInit:
    """Starts each loader worker: batches then reach the main process as shared-memory files
    named in the message (torch's `file_system` sharing strategy), then `fn` runs.

    With torch's default strategy every tensor of every batch (eight for pre-training) goes as a
    file descriptor, each over its own authenticated connection to the worker: the same files
    loaded 7% slower that way, ~146 us more CPU a sample (benchmarks/README.md). torch's
    shared-memory manager unlinks the files of a process that dies.
    """

    def __init__(self, fn: Any = None) -> None:
        self.fn = fn

    def __call__(self, worker_id: int) -> None:
        torch.multiprocessing.set_sharing_strategy("file_system")
        if self.fn is not None:
            self.fn(worker_id)


class SohoLoader(StreamingDataLoader):
    """StreamingDataLoader that counts fallback samples, turns stalls into DataError and hands
    batches over by shared-memory file name (`WorkerInit`, whatever `worker_init_fn` is set)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.num_workers > 0:
            check_worker_tempdir()
            remove_orphan_batch_files()
        self.skipped = 0

    @property
    def worker_init_fn(self) -> WorkerInit:
        return self._worker_init

    @worker_init_fn.setter
    def worker_init_fn(self, fn: Any) -> None:
        self._worker_init = fn if isinstance(fn, WorkerInit) else WorkerInit(fn)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        try:
            for batch in super().__iter__():
                self.skipped += int((~batch["sample_valid"]).sum())
                yield batch
        except Exception as e:
            message = str(e)
            if "Original Traceback" in message and "DataError:" in message:
                # An error from a worker arrives as its traceback text; keep its one line.
                raise DataError(message.rsplit("DataError:", 1)[1].strip()) from e
            if "timed out" in message and isinstance(self.dataset, SohoStreamingDataset):
                raise self.stall_error() from e
            raise

    def stall_error(self) -> DataError:
        dataset: SohoStreamingDataset = self.dataset  # type: ignore[assignment]
        stuck = [
            dataset.shard_url(i)
            for i in range(dataset.num_shards)
            if dataset._shard_states[i] in (_PREPARING, _FAILED)
        ]
        where = ", ".join(stuck) if stuck else "no shard download in progress"
        return DataError(
            f"data loader stalled for {self.timeout:.0f} s (stuck: {where}); check the storage "
            "endpoint and that every shard exists"
        )


def build_dataset(
    sources: Sequence[StreamSource | str],
    processor: SampleProcessor | None,
    cache_root: str,
    batch_size: int,
    shuffle: bool = True,
    shuffle_seed: int = 9176,
    num_canonical_nodes: int = 1,
    download_retry: int = 3,
    download_timeout: float = 60.0,
    validate_hash: str | None = "xxh64",
    predownload: int | None = None,
    verify_shards: bool = True,
    clean_stale_shm: bool = True,
) -> SohoStreamingDataset:
    """A streaming dataset over one or more shard folders mixed by proportion.

    `batch_size` is the per-rank batch; keep the global batch and `num_canonical_nodes` fixed
    across restarts to resume exactly once on another number of ranks.
    """
    if clean_stale_shm:
        clean_stale_shared_memory()
    streams = []
    for position, source in enumerate(sources):
        source = StreamSource(source) if isinstance(source, str) else source
        local_only = not source.remote.startswith("s3://")
        streams.append(
            Stream(
                remote=None if local_only else source.remote,
                local=source.remote
                if local_only
                else stream_cache_dir(cache_root, source.remote, position),
                proportion=source.proportion,
            )
        )
    try:
        return SohoStreamingDataset(
            streams,
            processor,
            verify_shards=verify_shards,
            batch_size=batch_size,
            shuffle=shuffle,
            shuffle_seed=shuffle_seed,
            num_canonical_nodes=num_canonical_nodes,
            download_retry=download_retry,
            download_timeout=download_timeout,
            validate_hash=validate_hash,
            predownload=predownload,
        )
    except DataError:
        raise
    except Exception as e:  # streaming/botocore raise many types while fetching index.json
        where = ", ".join(join_url(s.remote or s.local, INDEX_BASENAME) for s in streams)
        raise DataError(f"cannot open {where} ({type(e).__name__}: {e})") from e


def remove_orphan_batch_files(folder: str = "/dev/shm") -> list[str]:
    """Delete batch files (`WorkerInit`) left by workers that no longer run.

    A worker killed together with torch's shared-memory manager (SIGKILL of the process group,
    a preempted job) leaves the files of its batches in flight; torch names them
    `torch_<creating pid>_...`. A running process's files are kept.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        parts = name.split("_")
        if len(parts) < 3 or parts[0] != "torch" or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # still running (or not ours to signal): keep
        except ProcessLookupError:
            pass
        except OSError:
            continue
        try:
            os.remove(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def check_worker_tempdir() -> None:
    """DataLoader workers hand batches over through Unix sockets in the temporary folder
    (multiprocessing's, and torch's shared-memory manager's with `WorkerInit`). A path longer than
    AF_UNIX allows (107 bytes) makes every worker fail or drop its batches (the error only reaches
    stderr) and the loader wait out its stall time-out: fail now."""
    from multiprocessing.connection import arbitrary_address

    length = len(arbitrary_address("AF_UNIX").encode())
    if length > 107:
        raise DataError(
            f"temporary folder {tempfile.gettempdir()} is too long for the data loader workers' "
            f"sockets ({length} > 107 bytes with the socket name); set TMPDIR to a shorter folder"
        )


def build_loader(
    dataset: SohoStreamingDataset,
    batch_size: int,
    num_workers: int = 2,
    stall_timeout_s: float = 300.0,
    persistent_workers: bool = False,
) -> SohoLoader:
    """The loader for `dataset`, with the collate function of its task."""
    task = dataset.processor.task if dataset.processor else "pretrain"
    return SohoLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=COLLATE_BY_TASK[task],
        drop_last=False,
        timeout=stall_timeout_s if num_workers > 0 else 0,
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=PREFETCH_FACTOR if num_workers > 0 else None,
    )
