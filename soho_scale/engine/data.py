"""The loaders of a job, built one way for training and evaluation: the job's streams through
`data_pipeline` (its sample processor, shard cache, retry and stall settings), batched by the
task's collate."""

from __future__ import annotations

import functools
import os
from typing import Any

from data_pipeline import settings
from data_pipeline.collate import COLLATE_BY_TASK
from data_pipeline.loader import SohoLoader, build_loader
from data_pipeline.samples import SampleProcessor
from data_pipeline.streaming import SohoStreamingDataset, StreamSource, build_dataset
from soho_scale.engine.distributed import node_index
from soho_scale.spec import Job
from soho_scale.tasks import sample_processor


def job_loader(
    job: Job,
    streams: list[Any],
    cache_root: str,
    batch_size: int,
    shuffle: bool,
    processor: SampleProcessor,
    workers: int | None = None,
    collate_fn: Any = None,
    epoch_size: int | None = None,
) -> tuple[SohoStreamingDataset, SohoLoader]:
    """(dataset, loader) over `streams` (the job's `data.streams` or `eval.streams`)."""
    data = job.data
    dataset = build_dataset(
        [StreamSource(s.remote, s.proportion) for s in streams],
        processor,
        cache_root=cache_root,
        batch_size=batch_size,
        shuffle=shuffle,
        shuffle_seed=job.seed + settings.SHUFFLE_SEED,
        num_canonical_nodes=data.num_canonical_nodes or job.resources.nodes,
        download_retry=data.download_retry,
        download_timeout=data.download_timeout,
        download_deadline_s=data.download_deadline_s,
        validate_hash=data.validate_hash,
        epoch_size=epoch_size,
    )
    loader = build_loader(
        dataset,
        batch_size=batch_size,
        num_workers=data.workers if workers is None else workers,
        # A download waiting out an outage is not a stall: it fails by itself at its deadline.
        stall_timeout_s=data.stall_timeout_s + data.download_deadline_s,
        collate_fn=collate_fn,
    )
    return dataset, loader


def train_loader(
    job: Job, run_dir: str, micro_batch: int
) -> tuple[SohoStreamingDataset, SohoLoader]:
    """The training data: `data.streams`, shuffled, one shard cache per node (two "nodes" on one
    machine must not share streaming's folders)."""
    cache_root = os.path.join(
        job.data.cache_dir or os.path.join(run_dir, "shard_cache"),
        f"node{node_index()}",
    )
    return job_loader(
        job, job.data.streams, cache_root, micro_batch, job.data.shuffle, sample_processor(job),
        epoch_size=job.data.epoch_size,
    )  # fmt: skip


def collate_keeping(samples: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """The task's collate, plus the raw columns each sample kept (`kept`, a list)."""
    batch = COLLATE_BY_TASK[task](samples)
    batch["kept"] = [s["kept"] for s in samples]
    return batch


def eval_loader(
    job: Job,
    cache_root: str,
    batch_size: int,
    processor: SampleProcessor,
    workers: int | None = None,
) -> tuple[SohoStreamingDataset, SohoLoader]:
    """The evaluation data: `eval.streams`, unshuffled; batches carry the raw columns the
    metric needs (`kept`)."""
    return job_loader(
        job,
        job.eval.streams,
        cache_root,
        batch_size,
        False,
        processor,
        workers,
        functools.partial(collate_keeping, task=job.data.task),
    )
