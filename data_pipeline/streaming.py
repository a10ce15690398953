"""Streaming datasets: MDS shards (local folder or s3://) -> processed samples, with the checks
streaming leaves out (the correctness layer of DESIGN.md).

`SohoStreamingDataset` is a mosaicml-streaming `StreamingDataset` that runs a `SampleProcessor`
on every raw sample and makes data problems errors that name the shard:
- before the first epoch, every shard listed in a remote `index.json` exists with its listed
  size (`verify_remote_shards`), and cached shards whose hash is known are re-validated and
  purged if corrupt (`purge_corrupt_cached_shards`): streaming checks a hash only right after a
  download and reuses a corrupt cached file;
- during an epoch, a shard that cannot be fetched or fails its hash check, an error in
  streaming's background threads, and an epoch that ends short all raise `DataError` on every
  worker (`patches/streaming_shard_state.py`: streaming would hang or end the epoch silently).

What this module touches of streaming's internals lives in `data_pipeline.patches` (the shard
state checks, and three speed patches for shards on local disk). `build_dataset` mixes one or
more shard folders by proportion; `data_pipeline.loader` turns a dataset into batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streaming import Stream, StreamingDataset
from streaming.base.hashing import get_hash
from streaming.base.util import clean_stale_shared_memory
from streaming.base.world import World

from data_pipeline import settings
from data_pipeline.errors import DataError
from data_pipeline.patches import (
    streaming_barrier,
    streaming_local_fastpath,
    streaming_mapped_shards,
    streaming_shard_state,
)
from data_pipeline.patches.streaming_local_fastpath import LocalFastPath
from data_pipeline.patches.streaming_mapped_shards import MappedShards
from data_pipeline.patches.streaming_shard_state import ShardStateChecks
from data_pipeline.samples import SampleProcessor
from data_pipeline.storage import INDEX_BASENAME, object_sizes, read_index, s3_client, shard_files
from data_pipeline.urls import is_s3_url, join_url

logger = logging.getLogger(__name__)


def install_patches() -> None:
    """Decide (once per process) which streaming patches run; a correctness patch that cannot
    vouch for the installed streaming raises PatchError here."""
    streaming_shard_state.install()
    streaming_local_fastpath.install()
    streaming_mapped_shards.install()
    streaming_barrier.install()


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
        **kwargs: Any,
    ) -> None:
        install_patches()
        self.processor = processor
        self.epoch = 0  # set by ShardStateChecks when an epoch starts in this worker
        self._process_local: dict[str, Any] = {}
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
        if streaming_barrier.install():
            streaming_barrier.use_polling_barrier(self)

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
        return super().get_item(sample_id)

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        raw = super().get_item(sample_id, retry)
        if self.processor is None:
            return {**raw, "sample_id": sample_id}
        out = self.processor(raw, sample_id, self.epoch)
        if not out["valid"]:
            logger.warning(
                "sample %d (image_id %s) did not decode; a blank image stands in for it "
                "(counted in skipped_samples)",
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
    validate_hash: str | None = settings.VALIDATE_HASH,
    predownload: int | None = None,
    verify_shards: bool = True,
    clean_stale_shm: bool = True,
) -> SohoStreamingDataset:
    """A streaming dataset over one or more shard folders mixed by proportion.

    `batch_size` is the per-rank batch; keep the global batch and `num_canonical_nodes` fixed
    across restarts to resume exactly once on another number of ranks. The defaults are the job
    spec's (`data_pipeline.settings`).
    """
    install_patches()  # a refusal is its own one-line error, not a failure to open the data
    if clean_stale_shm:
        clean_stale_shared_memory()
    streams = []
    for position, source in enumerate(sources):
        source = StreamSource(source) if isinstance(source, str) else source
        remote = is_s3_url(source.remote)
        streams.append(
            Stream(
                remote=source.remote if remote else None,
                local=stream_cache_dir(cache_root, source.remote, position)
                if remote
                else source.remote,
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
