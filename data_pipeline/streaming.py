"""Streaming datasets: MDS shards (local folder or s3://) -> processed samples, with the checks
streaming leaves out (the correctness layer of DESIGN.md).

`SohoStreamingDataset` is a mosaicml-streaming `StreamingDataset` that runs a `SampleProcessor`
on every raw sample and makes data problems errors that name the shard:
- before the first epoch, every shard listed in a remote `index.json` exists with its listed
  size (`verify_remote_shards`), and cached shards whose hash is known are re-validated and
  purged if corrupt (`purge_corrupt_cached_shards`): streaming checks a hash only right after a
  download and reuses a corrupt cached file;
- before the first read of a shard of a local source folder (which streaming never hashes), the
  shard matches its size and `validate_hash` hash in index.json (`check_source_shard`), hashed
  once per node and file version;
- during an epoch, a shard that cannot be fetched or fails its hash check, an error in
  streaming's background threads, and an epoch that ends short all raise `DataError` on every
  worker (`patches/streaming_shard_state.py`: streaming would hang or end the epoch silently).

What this module touches of streaming's internals lives in `data_pipeline.patches` (the shard
state checks, the download deadline that rides out storage outages, and three speed patches for
shards on local disk). `build_dataset` mixes one or
more shard folders by proportion; `data_pipeline.loader` turns a dataset into batches.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from streaming import Stream, StreamingDataset
from streaming.base.hashing import get_hash
from streaming.base.world import World

from data_pipeline import settings
from data_pipeline.errors import DataError
from data_pipeline.patches import (
    streaming_barrier,
    streaming_download_deadline,
    streaming_job_prefix,
    streaming_local_fastpath,
    streaming_mapped_shards,
    streaming_shard_state,
    streaming_shm_attach,
    streaming_stale_shm,
)
from data_pipeline.patches.streaming_download_deadline import DeadlineStream
from data_pipeline.patches.streaming_local_fastpath import LocalFastPath
from data_pipeline.patches.streaming_mapped_shards import MappedShards
from data_pipeline.patches.streaming_shard_state import ShardStateChecks
from data_pipeline.samples import SampleProcessor
from data_pipeline.storage import (
    INDEX_BASENAME,
    PatientS3,
    read_index,
    s3_client,
    shard_files,
    stored_shard_sizes,
)
from data_pipeline.task_columns import layouts_problem
from data_pipeline.urls import is_s3_url, join_url

logger = logging.getLogger(__name__)


def install_patches() -> None:
    """Decide (once per process) which streaming patches run; a correctness patch that cannot
    vouch for the installed streaming raises PatchError here."""
    streaming_shard_state.install()
    streaming_local_fastpath.install()
    streaming_mapped_shards.install()
    streaming_barrier.install()
    streaming_download_deadline.install()
    streaming_stale_shm.install()
    streaming_job_prefix.install()
    streaming_shm_attach.install()


@dataclass(frozen=True)
class StreamSource:
    """One shard folder (local path or s3:// URL) and its share of each epoch."""

    remote: str
    proportion: float | None = None


class SohoStreamingDataset(ShardStateChecks, LocalFastPath, MappedShards, StreamingDataset):
    """StreamingDataset returning processed samples with their dataset index (`sample_id`)."""

    def __init__(
        self,
        streams: Sequence[Stream],
        processor: SampleProcessor | None,
        verify_shards: bool = True,
        checked_shards_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        install_patches()
        self.processor = processor
        self.source_checks = SourceShardChecks(checked_shards_dir, kwargs.get("validate_hash"))
        self.epoch = 0  # set by ShardStateChecks when an epoch starts in this worker
        self._process_local: dict[str, Any] = {}
        if World.detect().is_local_leader:
            for stream in streams:
                if verify_shards:
                    client = (
                        PatientS3(
                            s3_client(kwargs["download_timeout"], kwargs["download_retry"]),
                            getattr(stream, "download_deadline_s", 0.0),
                        )
                        if stream.remote
                        else None
                    )
                    verify_remote_shards(stream.remote or stream.local, client)
                if stream.remote and stream.local:  # never purge a local-only source folder
                    purge_corrupt_cached_shards(stream.local)
        if dist.is_available() and dist.is_initialized():
            # The node's other ranks read the cached index.json in streaming's __init__: only
            # once the leader has checked it (or deleted it to be fetched again).
            dist.barrier()
        super().__init__(streams=list(streams), **kwargs)
        if processor is not None:
            self.check_columns(processor.task)
        if streaming_barrier.install():
            streaming_barrier.use_polling_barrier(self)

    def check_columns(self, task: str) -> None:
        """DataError naming the stream whose shards lack a column `task` reads (or hold it in
        another encoding), before any sample is read."""
        for stream_id, stream in enumerate(self.streams):
            layouts = (
                (reader.column_names, reader.column_encodings)
                for reader, owner in zip(self.shards, self.stream_per_shard)
                if owner == stream_id
            )
            problem = layouts_problem(layouts, task)
            if problem:
                raise DataError(f"{stream.remote or stream.local}: {problem}")

    def process_local(self) -> dict[str, Any]:
        """State that belongs to this process only (mappings, locks, this epoch's counts): not
        pickled to spawned workers."""
        return self._process_local

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_process_local": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        install_patches()  # a spawned worker decides for itself

    def shard_url(self, shard_id: int) -> str:
        stream = self.streams[self.stream_per_shard[shard_id]]
        basename = shard_files_of(self.shards[shard_id])[0]
        return join_url(stream.remote or stream.local, basename)

    def raw_sample(self, sample_id: int) -> dict[str, Any]:
        """The sample as stored in its shard (columns decoded, nothing processed)."""
        self.check_source_shard(sample_id)
        return super().get_item(sample_id)

    def check_source_shard(self, sample_id: int) -> None:
        """Before the first read of a shard of a local source folder in this process: the shard
        matches index.json (size, and the `validate_hash` hash), else every worker of the node
        stops with a DataError naming it, as for a downloaded shard that fails its hash. The
        check is kept per file (`SourceShardChecks`), so a shard is hashed once per node while
        its size and modification time stay the same."""
        local = self.process_local()
        if "source_shards" not in local:  # (first sample of each shard, 1 = nothing to check)
            remote = [self.streams[s].remote is not None for s in self.stream_per_shard]
            local["source_shards"] = (self.sample_offset_per_shard.tolist(), bytearray(remote))
        starts, done = local["source_shards"]
        shard_id = bisect.bisect_right(starts, sample_id) - 1  # a fifth of the spanner's time
        if not done[shard_id]:
            shard = self.shards[shard_id]
            folder = os.path.join(shard.dirname, shard.split or "")
            problem = self.source_checks.problem(folder, shard.file_pairs)
            if problem:
                self.mark_failed(shard_id)
                raise DataError(
                    f"shard {self.shard_url(shard_id)} does not match its {INDEX_BASENAME} "
                    f"({problem}); the shard was altered or is corrupt, rewrite it"
                )
            done[shard_id] = 1

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        self.check_source_shard(sample_id)
        raw = super().get_item(sample_id, retry)
        if self.processor is None:
            return {**raw, "sample_id": sample_id}
        out = self.processor(raw, sample_id, self.epoch)
        if not out["valid"]:
            logger.warning(
                "sample %d (image_id %s) did not decode; a blank image stands in for it, left "
                "out of training (counted in skipped_samples) and scored by an evaluation "
                "(counted in num_samples_undecodable)",
                sample_id,
                raw.get("image_id", raw.get("identifier", "?")),
            )
        return out


def shard_files_of(shard: Any) -> list[str]:
    """Basenames a streaming shard reader is stored as (compressed file when there is one)."""
    return [(zip_info or raw_info).basename for raw_info, zip_info in shard.file_pairs]


def verify_remote_shards(remote: str, client: Any = None) -> None:
    """Every shard listed in index.json exists with its listed size, or DataError naming it."""
    index = read_index(remote, client)
    sizes = stored_shard_sizes(remote, index, client)
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
    try:
        index = read_index(local)
    except DataError as e:
        # A cache file: without it streaming fetches the remote's again.
        logger.warning("cached %s; fetching it again", e)
        os.remove(index_path)
        return []
    purged = []
    for shard in index.get("shards", []):
        for key in ("raw_data", "zip_data"):
            info = shard.get(key)
            path = os.path.join(local, info["basename"]) if info else None
            if not path or not os.path.isfile(path):
                continue
            if file_problem(path, info["bytes"], info["hashes"], "xxh64"):
                logger.warning("cached shard %s is corrupt; deleting it to download again", path)
                os.remove(path)
                purged.append(path)
    return purged


def file_problem(path: str, size: int, hashes: dict[str, str], algo: str | None) -> str | None:
    """What differs between shard file `path` and its index.json entry (`size`, `hashes`): its
    size, then its hash by `algo` (or, when the index does not list `algo`, by xxh64 or sha1);
    None when it matches. `algo` None checks the size only."""
    actual = os.path.getsize(path)
    if actual != size:
        return f"{actual} bytes, {INDEX_BASENAME} says {size}"
    algo = next((a for a in (algo, "xxh64", "sha1") if a in hashes), None) if algo else None
    if algo is None or size == 0:
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        digest = get_hash(algo, data)  # type: ignore[arg-type]  # any buffer: no copy in memory
    if digest != hashes[algo]:
        return f"{algo} {digest}, {INDEX_BASENAME} says {hashes[algo]}"
    return None


class SourceShardChecks:
    """Which shard files of local source folders matched their index.json, kept per file
    (path, size, modification time, algorithm): in this process, and as an empty marker file in
    `marker_dir` (the run's shard cache, shared by the ranks and loader workers of a node and by
    later epochs and restarts), so that a shard is hashed once, not by every worker every epoch
    (a 256 MB shard in the page cache: 0.16 s by xxh64, 1.1 s by sha1, on a busy 2-core machine;
    a sample already checked costs 0.2 us against ~9 us to read it, 2026-12-06).
    A file rewritten in place with the same size and modification time is not hashed again."""

    _matched: set[str] = set()  # keys matched in this process

    def __init__(self, marker_dir: str | None, algo: str | None) -> None:
        self.marker_dir = marker_dir
        self.algo = algo

    def problem(self, folder: str, file_pairs: list[tuple[Any, Any]]) -> str | None:
        """What is wrong with the shard stored as `file_pairs` in `folder`; None if nothing."""
        for raw_info, zip_info in file_pairs:
            info = raw_info
            path = os.path.join(folder, raw_info.basename)
            if zip_info is not None and not os.path.isfile(path):
                info, path = zip_info, os.path.join(folder, zip_info.basename)
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                return f"{os.path.basename(path)} is missing"
            key = hashlib.sha1(
                f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{self.algo}".encode()
            ).hexdigest()
            marker = os.path.join(self.marker_dir, key) if self.marker_dir else None
            if key in self._matched or (marker and os.path.exists(marker)):
                continue
            problem = file_problem(path, info.bytes, info.hashes, self.algo)
            if problem:
                return f"{os.path.basename(path)}: {problem}"
            self._matched.add(key)
            if marker:
                os.makedirs(self.marker_dir, exist_ok=True)
                open(marker, "w").close()
        return None


def stream_cache_dir(cache_root: str, remote: str, position: int) -> str:
    """A cache folder unique to (run cache root, stream): ranks of a node agree on it."""
    digest = hashlib.sha1(remote.encode()).hexdigest()[:12]
    return os.path.join(cache_root, f"stream{position}-{digest}")


def build_dataset(
    sources: Sequence[StreamSource | str],
    processor: SampleProcessor | None,
    cache_root: str,
    batch_size: int,
    shuffle: bool = True,
    shuffle_seed: int = settings.SHUFFLE_SEED,
    num_canonical_nodes: int = settings.NUM_CANONICAL_NODES,
    download_retry: int = settings.DOWNLOAD_RETRY,
    download_timeout: float = settings.DOWNLOAD_TIMEOUT_S,
    download_deadline_s: float = settings.STORAGE_DEADLINE_S,
    validate_hash: str | None = settings.VALIDATE_HASH,
    predownload: int | None = None,
    verify_shards: bool = True,
    clean_stale_shm: bool = True,
    epoch_size: int | None = None,
) -> SohoStreamingDataset:
    """A streaming dataset over one or more shard folders mixed by proportion; `epoch_size`:
    the samples an epoch draws (streaming repeats or subsamples each stream to its share).

    `batch_size` is the per-rank batch; keep the global batch and `num_canonical_nodes` fixed
    across restarts to resume exactly once on another number of ranks. The defaults are the job
    spec's (`data_pipeline.settings`).
    """
    install_patches()  # a refusal is its own one-line error, not a failure to open the data
    if clean_stale_shm and streaming_stale_shm.install():
        # Before any rank of the node looks for a free prefix: they must all see the same files.
        if World.detect().is_local_leader:
            streaming_stale_shm.remove_stale()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    streams = []
    for position, source in enumerate(sources):
        source = StreamSource(source) if isinstance(source, str) else source
        remote = is_s3_url(source.remote)
        streams.append(
            DeadlineStream(
                remote=source.remote if remote else None,
                local=stream_cache_dir(cache_root, source.remote, position)
                if remote
                else source.remote,
                proportion=source.proportion,
                download_deadline_s=download_deadline_s,
            )
        )
    try:
        return SohoStreamingDataset(
            streams,
            processor,
            verify_shards=verify_shards,
            checked_shards_dir=os.path.join(cache_root, "checked_source_shards"),
            batch_size=batch_size,
            shuffle=shuffle,
            shuffle_seed=shuffle_seed,
            num_canonical_nodes=num_canonical_nodes,
            download_retry=download_retry,
            download_timeout=download_timeout,
            validate_hash=validate_hash,
            predownload=predownload,
            epoch_size=epoch_size,
        )
    except DataError:
        raise
    except Exception as e:  # streaming/botocore raise many types while fetching index.json
        where = ", ".join(join_url(s.remote or s.local, INDEX_BASENAME) for s in streams)
        raise DataError(f"cannot open {where} ({type(e).__name__}: {e})") from e
