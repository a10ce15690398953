"""Evaluation: a downstream metric of a checkpoint on N ranks (`soho-scale eval JOB --checkpoint
CKPT [--nproc N] [--out DIR]`; one rank of it is `run_evaluation`).

Every rank builds the task model, loads the checkpoint (an exported weights file or a committed
checkpoint, `soho_scale.engine.weights`), reads its share of `job.eval.streams` (no shuffle)
and predicts per sample; only the small per-sample records travel to rank 0. Streaming pads a
rank's share with repeated samples, so rank 0 keeps one record per `sample_id` and checks that
every sample of the dataset was scored exactly once. Images are encoded batch-independently
(soho_scale.tasks.visual), so N ranks give exactly the single-rank numbers.

Rank 0 writes `metrics.json`, the predictions (VQA also the test-dev/std submission file) under
--out, and logs an MLflow child run of the training run the checkpoint came from.
`evaluate_task(job, model, loader, rank, world)` is the same evaluation for in-process use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.samples import SampleProcessor
from data_pipeline.storage import read_bytes
from data_pipeline.urls import is_s3_url, join_url
from soho_scale.engine.data import eval_loader
from soho_scale.engine.distributed import device, setup_distributed, to_device
from soho_scale.engine.lineage import dataset_inputs, stream_records
from soho_scale.engine.tracking import Tracker
from soho_scale.engine.weights import load_initial_weights
from soho_scale.secrets import MASK
from soho_scale.spec import Job
from soho_scale.tasks import build_task_evaluation, build_task_model, sample_processor

logger = logging.getLogger(__name__)


class EvalError(ValueError):
    """An evaluation a user asked for cannot run (no eval streams, wrong checkpoint, ...)."""


@dataclass
class KeepColumnsProcessor(SampleProcessor):
    """The task's processor, plus raw shard columns the metric needs (VQA: the 10 human
    answers, which the training batch does not carry; None for a column older shards lack)."""

    keep: tuple[str, ...] = ()

    def __call__(self, raw: dict[str, Any], sample_id: int, epoch: int) -> dict[str, Any]:
        out = super().__call__(raw, sample_id, epoch)
        out["kept"] = {column: _plain(raw.get(column)) for column in self.keep}
        return out


def _plain(value: Any) -> Any:
    # MDS json columns come back as lists/dicts already; numpy scalars become Python numbers.
    return value.item() if hasattr(value, "item") and not isinstance(value, list | str) else value


def build_eval_loader(
    job: Job,
    cache_root: str,
    batch_size: int,
    keep_columns: tuple[str, ...] = (),
    workers: int | None = None,
):
    """(dataset, loader) over `eval.streams`, unshuffled, batches carrying `kept` columns."""
    if not job.eval.streams:
        raise EvalError(f"eval.streams: job {job.name} names no evaluation data; add eval.streams")
    processor = sample_processor(job, KeepColumnsProcessor, keep=tuple(keep_columns))
    return eval_loader(job, cache_root, batch_size, processor, workers)


def _gather_to_rank0(part: Any, rank: int, world: int) -> list[Any]:
    if world == 1 or not dist.is_initialized():
        return [part]
    parts: list[Any] = [None] * world if rank == 0 else None
    dist.gather_object(part, parts, dst=0)
    return parts if rank == 0 else []


def evaluate_task(
    job: Job,
    model: nn.Module,
    loader: Any,
    rank: int = 0,
    world: int = 1,
    evaluation: Any = None,
    progress: bool = False,
) -> tuple[dict[str, float], list[dict]]:
    """Predict this rank's share, gather to rank 0, score. Returns (metrics, predictions sorted
    by sample id) on rank 0 and on every rank the same metrics (predictions only on rank 0)."""
    if job.data.task == "retrieval":  # all image x text pairs: its own protocol
        from soho_scale.tasks.retrieval_eval import evaluate_job

        # images before any was skipped; rank 0's count is the one every rank uses
        converted = eval_conversion_report(job).get("records") if rank == 0 else None
        return evaluate_job(job, model, loader, rank, world, converted_images=converted)
    if evaluation is None:
        evaluation = build_task_evaluation(job, rank)
    param = next(model.parameters())  # a training engine's model may be bf16 or fp16
    was_training = model.training
    model.eval()
    records: list[dict] = []
    undecoded: list[int] = []  # scored on the blank stand-in of an image that did not decode
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(desc=f"eval {job.data.task}", unit="batch", dynamic_ncols=True)
    with torch.no_grad():
        for batch in loader:
            undecoded += batch["sample_ids"][~batch["sample_valid"]].tolist()
            records += evaluation.predict(model, to_device(batch, param.device, param.dtype))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    model.train(was_training)

    metrics: dict[str, float] = {}
    predictions: list[dict] = []
    parts = _gather_to_rank0((records, undecoded), rank, world)
    if rank == 0:
        unique: dict[int, dict] = {}
        for part, _ in parts:
            for record in part:
                unique.setdefault(record["sample_id"], record)  # streaming's padding repeats
        expected = getattr(getattr(loader, "dataset", None), "num_samples", None)
        if expected is not None and sorted(unique) != list(range(expected)):
            raise EvalError(
                f"evaluation scored {len(unique)} distinct samples of {expected}: the loader "
                "skipped samples (is data.shuffle on, or a stream proportion set?)"
            )
        predictions = [unique[k] for k in sorted(unique)]
        metrics = {**evaluation.score(predictions), "num_samples": float(len(predictions))}
        bad = {sample_id for _, ids in parts for sample_id in ids}
        if bad:
            logger.warning(
                "%s: %d samples' images did not decode; each was scored on a blank image",
                job.data.task, len(bad),
            )  # fmt: skip
        metrics["num_samples_undecodable"] = float(len(bad))
    if world > 1 and dist.is_initialized():
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics, predictions


# ---- the command: one process per rank ------------------------------------------------------


def dataset_sha256(records: list[dict[str, Any]]) -> str:
    """sha256 over the eval streams' index digests (`lineage.stream_records`): which data was
    scored."""
    return hashlib.sha256("".join(r["index_sha256"] for r in records).encode()).hexdigest()


def eval_conversion_report(job: Job) -> dict[str, Any]:
    """The first eval stream's conversion_report.json; {} for shards written without one."""
    from data_pipeline.errors import DataError
    from data_pipeline.shards import REPORT_NAME

    try:
        report = json.loads(read_bytes(join_url(job.eval.streams[0].remote, REPORT_NAME)))
    except (DataError, ValueError, IndexError):
        return {}
    return report if isinstance(report, dict) else {}


def eval_dataset(job: Job) -> str:
    """The published dataset the first eval stream was converted from ("MSCOCO", "NLVR2", ...);
    "unknown" for shards written without a conversion report."""
    from data_pipeline.sources import dataset_name

    report = eval_conversion_report(job)
    return dataset_name(report) if report else "unknown"


def parent_run(checkpoint: str, source: str | None = None) -> dict[str, str]:
    """The training run's tracking.json ({"run_id", "tracking_uri"}) found above the checkpoint
    (or above the checkpoint an exported file came from); {} when there is none."""
    for start in (checkpoint, source):
        if not start or is_s3_url(start):
            continue
        folder = os.path.dirname(os.path.abspath(start.rstrip("/")))
        for _ in range(4):  # <run>/checkpoints/step_N, <run>/export/model.pt
            path = os.path.join(folder, "tracking.json")
            if os.path.isfile(path):
                with open(path) as f:
                    return json.load(f)
            folder = os.path.dirname(folder)
    return {}


def _child_tracker(out_dir: str, job: Job, tags: dict[str, str], parent_uri: str | None):
    """A Tracker in the parent run's store (unless MLFLOW_TRACKING_URI says where)."""
    name = f"eval-{job.name}-{job.eval.split}"
    if os.environ.get("MLFLOW_TRACKING_URI") or not parent_uri or MASK in parent_uri:
        return Tracker(out_dir, job.tracking.experiment, name, tags)
    os.environ["MLFLOW_TRACKING_URI"] = parent_uri  # Tracker reads its store from here
    try:
        return Tracker(out_dir, job.tracking.experiment, name, tags)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def run_evaluation(
    job: Job, checkpoint: str, out_dir: str, batch_size: int | None = None
) -> dict[str, Any]:
    """One rank's part of `soho-scale eval`; rank 0 writes the outputs and the MLflow run."""
    rank, world = setup_distributed(deepspeed=False)
    model = build_task_model(job, job.model.config())
    report = load_initial_weights(model, checkpoint)
    if report["missing"]:
        raise EvalError(
            f"{checkpoint}: has no weights for {', '.join(report['missing'][:3])}; evaluate a "
            f"checkpoint fine-tuned on {job.data.task}, not a pre-training one"
        )
    model.to(device())
    evaluation = build_task_evaluation(job, rank) if job.data.task != "retrieval" else None
    keep = getattr(evaluation, "keep_columns", ())
    os.makedirs(out_dir, exist_ok=True)
    cache = job.data.cache_dir or os.path.join(out_dir, "shard_cache")
    _, loader = build_eval_loader(job, cache, batch_size or job.batch.micro_batch_per_rank, keep)
    metrics, predictions = evaluate_task(job, model, loader, rank, world, evaluation, progress=True)
    result = {
        "task": job.data.task,
        "split": job.eval.split,
        "checkpoint": checkpoint,
        "checkpoint_step": report.get("step"),
        "world_size": world,
        "metrics": metrics,
    }
    if rank == 0:
        streams = stream_records([s.remote for s in job.eval.streams])  # each index read once
        result["dataset_sha256"] = dataset_sha256(streams)
        files = [os.path.join(out_dir, "metrics.json")]
        with open(files[0], "w") as f:
            json.dump(result, f, indent=2)
        if evaluation is not None:
            files += evaluation.write_outputs(predictions, out_dir, job.eval.split)
        parent = parent_run(checkpoint, report.get("exported_from"))
        tags = {
            "checkpoint": checkpoint,
            "checkpoint_step": str(report.get("step")),
            "dataset_sha256": result["dataset_sha256"],
            "task": job.data.task,
            "split": job.eval.split,
            "dataset": eval_dataset(job),
        }
        for path in files:  # the report's VQA test-dev/std row: "submit FILE"
            if path.endswith("_submission.json"):
                tags["submission"] = os.path.abspath(path)
        if parent.get("run_id"):
            tags["mlflow.parentRunId"] = parent["run_id"]
        tracker = _child_tracker(out_dir, job, tags, parent.get("tracking_uri"))
        tracker.log_params(
            {"world_size": world, "eval.streams": [s.remote for s in job.eval.streams]}
        )
        tracker.log_inputs(dataset_inputs(streams, "eval"))
        tracker.log_metrics(
            {f"{job.eval.split}_{k}": v for k, v in metrics.items()}, int(report.get("step") or 0)
        )
        for path in files:
            tracker.log_artifact(path)
        tracker.finish()
        result["run_id"] = tracker.run_id
        print(json.dumps({k: result[k] for k in ("task", "split", "metrics", "run_id")}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result
