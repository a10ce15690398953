"""Evaluation while a job trains: a fine-tune's val split every `eval.every_steps` steps, and the
best checkpoint kept; and the job's downstream probes (`soho_scale.engine.probes`).

Every rank runs the evaluation in-process on the engine's model (`evaluate_task`, eval mode, no
gradients), on one eval loader built once. The training RNG streams are saved before and
restored after it (the eval loader's iterator draws its worker seed from the global generator),
so a run that evaluates trains on exactly the batches and losses of one that does not. The
metrics go to the training run at that step (`<split>_<metric>`), a checkpoint is forced there,
and rank 0 records the best so far in `<checkpoint.dir>/best.json` once that checkpoint is
committed; pruning (`keep_last`) never deletes it, a resumed run keeps the record and the
pipeline exports the best checkpoint rather than the last.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch

from data_pipeline.task_columns import check_stream_columns
from data_pipeline.urls import join_url
from soho_scale.engine import checkpoint_store as store
from soho_scale.engine.checkpoint import rng_state, set_rng_state
from soho_scale.engine.probes import Probes
from soho_scale.engine.stop import SIGNALS as STOP_SIGNALS
from soho_scale.spec import Job
from soho_scale.spec.eval_metrics import default_best_metric

logger = logging.getLogger("soho_scale.train")


@contextlib.contextmanager
def training_state_kept():
    """The process's RNG states (Python, numpy, torch, CUDA) as they were before the block, and
    cuDNN's autotuning off inside it: evaluation meets one shape per image size, each of which
    would be timed once and never again."""
    state, autotune = rng_state(), torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        set_rng_state(state)
        torch.backends.cudnn.benchmark = autotune


def best_metric(job: Job) -> str:
    """The metric that picks the best checkpoint: eval.best_metric, else the task's main one."""
    return job.eval.best_metric or default_best_metric(job.data.task, job.eval.retrieval_modes)


def better(record: dict[str, Any] | None, value: float) -> bool:
    """Whether `value` beats the best so far (higher is better; a tie keeps the earlier one)."""
    return record is None or value > record["value"]


def check_eval_data(job: Job) -> None:
    """A run that evaluates while it trains: DataError now when its `eval.streams` are no data
    for its task, not at its first evaluation, possibly hours into training (every rank: each
    fails alike)."""
    if job.eval.every_steps:
        for stream in job.eval.streams:
            check_stream_columns(stream.remote, job.data.task)


class PeriodicEval:
    """What a training run evaluates while it trains: every rank calls `evaluate` each step
    and `saved` after each checkpoint, and `finish` at the end; it does nothing not asked for."""

    def __init__(
        self, job: Job, run_dir: str, rank: int, world: int, resumed_at: int | None, tracker: Any
    ):
        self.job, self.rank, self.world, self.tracker = job, rank, world, tracker
        self.probes = Probes(job, run_dir, rank, tracker)
        self.every = job.eval.every_steps
        self.root = job.checkpoint.dir
        self.metric = best_metric(job) if self.every else None
        self.best: dict[str, Any] | None = None
        self.pending: dict[str, Any] | None = None  # a better value, recorded once committed
        self._loader = None
        self._evaluation = None
        self._cache = job.data.cache_dir or os.path.join(run_dir, "eval_shard_cache")
        if self.every and rank == 0:
            best = store.read_best(self.root) if resumed_at is not None else None
            if best is not None and best["step"] <= resumed_at:
                self.best = best
            else:  # an earlier run's record, or one of steps this run trains again
                store.clear_best(self.root)

    def due(self, step: int, total_steps: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == total_steps)

    def _data(self) -> tuple[Any, Any]:
        if self._loader is None:
            from soho_scale.engine.evaluate import build_eval_loader
            from soho_scale.tasks import build_task_evaluation

            if self.job.data.task != "retrieval":  # retrieval: its own protocol
                self._evaluation = build_task_evaluation(self.job, self.rank)
            keep = getattr(self._evaluation, "keep_columns", ())
            batch = self.job.batch.micro_batch_per_rank
            _, self._loader = build_eval_loader(self.job, self._cache, batch, keep)
            self._loader.worker_ignored_signals = STOP_SIGNALS  # as the training loader's
        return self._loader, self._evaluation

    def evaluate(self, model: Any, step: int, total_steps: int) -> bool:
        """Every rank: evaluate `model` when `step` is due and log the metrics; True when it
        did (the caller then checkpoints this step). Rank 0 also logs the probes that finished."""
        self.probes.poll()
        if not self.due(step, total_steps):
            return False
        from soho_scale.engine.evaluate import evaluate_task

        with training_state_kept():
            loader, evaluation = self._data()
            metrics, _ = evaluate_task(self.job, model, loader, self.rank, self.world, evaluation)
        split = self.job.eval.split
        self.tracker.log_metrics({f"{split}_{k}": float(v) for k, v in metrics.items()}, step)
        value = metrics.get(self.metric)
        if value is None:
            logger.warning(
                "step %d: the %s evaluation gave no %s; no best checkpoint is kept",
                step, split, self.metric,
            )  # fmt: skip
        elif better(self.best, float(value)):
            self.pending = {"step": step, "metric": self.metric, "value": float(value)}
        logger.info("step %d: %s %s %s", step, split, self.metric, value)
        return True

    def saved(self, step: int, start_probes: bool = True) -> None:
        """After the checkpoint of `step` is committed: rank 0 records a new best there and
        starts the probes due (not for a stopped job's last checkpoint)."""
        location = join_url(self.root, store.tag_for(step))
        if start_probes:
            self.probes.saved(step, location)
        if self.rank != 0 or self.pending is None or self.pending["step"] != step:
            return
        record = {**self.pending, "location": location}
        store.write_best(self.root, record)
        self.best, self.pending = record, None

    def finish(self, preempted: bool) -> None:
        """At the end of training: rank 0 waits (bounded) for its running probes."""
        self.probes.finish(preempted)
