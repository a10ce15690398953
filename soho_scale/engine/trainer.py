"""The trainer: build -> deepspeed.initialize -> loop {batch; forward; backward; step; log;
checkpoint}. One process per rank (started by `soho_scale.launch.node` or torchrun, through
`soho_scale.launch.rank`);
the same code runs on CPU over gloo and on GPUs over NCCL.

What the loop calls lives beside it: `step` (the module DeepSpeed wraps), `data` (the loader),
`checkpoint` (save, commit, find, stage, load), `tracking` (MLflow), `telemetry` (throughput,
MFU), `phases` (where a step's time goes), `lineage` (what the run records about itself),
`recorder` (the resume tests' record).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from soho_scale import PREEMPTED_EXIT_CODE
from soho_scale.engine.checkpoint import CheckpointManager
from soho_scale.engine.data import train_loader
from soho_scale.engine.deepspeed_config import prepare_for_engine
from soho_scale.engine.distributed import broadcast, setup_distributed, setup_logging, to_device
from soho_scale.engine.lineage import log_new_run
from soho_scale.engine.optimizer import apply_spec_settings, build_optimizer, lr_factor
from soho_scale.engine.periodic_eval import PeriodicEval, check_eval_data
from soho_scale.engine.phases import PhaseClock
from soho_scale.engine.recorder import make_recorder
from soho_scale.engine.resume_check import record as record_resume_changes
from soho_scale.engine.step import build_step
from soho_scale.engine.stop import SIGNALS as STOP_SIGNALS
from soho_scale.engine.stop import StopFlag
from soho_scale.engine.telemetry import FlopModel, MetricMeans, Throughput, peak_flops
from soho_scale.engine.tracking import make_tracker, recorded_run_id
from soho_scale.spec import Job, derived, dump_job

logger = logging.getLogger("soho_scale.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(job: Job, run_dir: str | None = None, stop: StopFlag | None = None) -> dict[str, Any]:
    rank, world = setup_distributed()
    setup_logging(rank)
    run_dir = broadcast(
        os.path.abspath(run_dir or os.path.join("runs", job.name)) if rank == 0 else None
    )
    os.makedirs(run_dir, exist_ok=True)
    import deepspeed

    checkpoints = CheckpointManager(job, run_dir)
    resume = checkpoints.prepare_resume(world)  # a resumed run skips the initial weights
    # First: MLflow answers (or not) in the background while the engine is built.
    tracker = make_tracker(
        rank, run_dir, job.tracking.experiment, job.tracking.run_name or job.name,
        job.tracking.tags,
        # a checkpoint saved before MLflow answered names no run: the run folder's does
        run_id=(resume.run_id or recorded_run_id(run_dir)) if resume else None,
    )  # fmt: skip
    # Same seed for the model on every rank (DeepSpeed broadcasts parameters, not buffers such as
    # the visual dictionary), then a per-rank seed for dropout and the objective's sampling.
    seed_everything(job.seed)
    step_module = build_step(job, initial_weights=resume is None)
    if torch.cuda.is_available():  # NCCL broadcasts device tensors only
        step_module.to(torch.device("cuda", torch.cuda.current_device()))
    # cuDNN times its algorithms once per new input shape and keeps the fastest: training's
    # batches come in a few hundred padded shapes over a run (evaluation turns it off).
    torch.backends.cudnn.benchmark = torch.cuda.is_available()
    for buffer in step_module.buffers():
        dist.broadcast(buffer, src=0)
    seed_everything(job.seed + rank)
    ds_config, dtype = prepare_for_engine(step_module, job, world)
    optimizer = build_optimizer(step_module, job.optim)

    dataset, loader = train_loader(job, run_dir, job.batch.micro_batch_per_rank)
    check_eval_data(job)  # with the training data's checks, before the first step
    # Worker seeds from the loader's own generator: the global RNG (checkpointed) is not touched,
    # so a resumed run draws exactly what the uninterrupted one drew.
    loader.generator = torch.Generator().manual_seed(job.seed + 1000 * rank)
    loader.worker_ignored_signals = STOP_SIGNALS
    numbers = derived(job, num_samples=dataset.epoch_size, world_size=world)  # resampled
    total_steps = numbers["total_steps"]
    schedule = functools.partial(
        lr_factor,
        warmup_steps=job.schedule.warmup_steps,
        warmup_start_factor=job.schedule.warmup_start_factor,
        decay_steps=numbers["decay_steps"] or [],
        gamma=job.schedule.gamma,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if resume is not None and resume.universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=step_module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    step, epoch = 0, 0
    if resume is not None:
        state = checkpoints.load(engine, resume)
        apply_spec_settings(optimizer, scheduler, job.optim)  # the job's LRs, not the saved ones
        step, epoch = state["step"], state["epoch"]
        loader.load_state_dict(state["loader"])
        logger.info("resumed from %s at step %d", resume.found.location, step)
    logger.info("engine ready: training steps %d-%d", step + 1, total_steps)

    if resume is not None:
        record_resume_changes(tracker, resume.changes, resume.found.location)
    with tracker.new_run_only():  # a reopened run (a resumed job's) has these already
        log_new_run(tracker, job, numbers, rank)
        spec_file = os.path.join(run_dir, "resolved_spec.yaml")
        if rank == 0 and (resume is None or not os.path.exists(spec_file)):  # the first spec
            with open(spec_file, "w") as f:
                f.write(dump_job(job))
        tracker.log_artifact(spec_file)

    stop = stop or StopFlag()  # the rank entry point makes it first, before its imports
    flops = FlopModel(job.model.config())
    peak = peak_flops(job.precision, job.resources.peak_flops)
    meter = Throughput()
    means = MetricMeans(engine.device)
    clock = PhaseClock(engine.device).attach(engine.module.model)
    recorder = make_recorder(job.tracking.record_samples, run_dir, rank, step)
    progress = _progress(rank, total_steps, step)
    resumed_at = step if resume is not None else None
    periodic = PeriodicEval(job, run_dir, rank, world, resumed_at, tracker)
    last_metrics: dict[str, float] = {}
    preempted = False
    while step < total_steps and not preempted:
        wait_start = time.perf_counter()
        for batch in loader:
            data_wait = time.perf_counter() - wait_start
            recorder.batch(batch)
            tokens = int(batch["text_mask"].sum())  # counted on the host: no device sync
            batch = to_device(batch, engine.device, dtype)
            with clock.span("forward"):
                loss, metrics = engine(batch)
            means.add(metrics)
            with clock.span("backward"):
                engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            with clock.span("optimizer"):
                engine.step()
            mlm_positions = int(metrics.get("mlm_count", 0))
            meter.add(
                batch["images"].shape[0],
                tokens,
                flops.forward_flops(batch, mlm_positions),
                data_wait,
            )
            if boundary:
                step += 1
                clock.step_done()
                recorder.step(loss)
                if step % job.tracking.log_every == 0 or step == total_steps:
                    skipped = {"skipped_samples": loader.skipped}  # every rank's: summed
                    last_metrics = _step_metrics(
                        engine, means.mean_over_ranks(skipped), meter, world, peak
                    )
                    last_metrics.update(clock.collect())  # rank 0's
                    tracker.log_metrics(last_metrics, step)
                    meter.reset()
                progress(step, last_metrics.get("loss"), last_metrics.get("samples_per_s"))
                preempted = stop.any_rank(engine.device)
                # a stopped job saves within its grace period: no evaluation first
                evaluated = not preempted and periodic.evaluate(
                    engine.module.model, step, total_steps
                )
                every = job.checkpoint.interval_steps
                if preempted or evaluated or step % every == 0 or step == total_steps:
                    checkpoints.run_id = tracker.run_id_now()  # at most 1 s for MLflow
                    checkpoints.save(engine, step, epoch, loader)
                    periodic.saved(step, start_probes=not preempted)
                if preempted or step >= total_steps:
                    break
            wait_start = time.perf_counter()
        else:
            epoch += 1
    summary = {
        "job": job.name,
        "steps": step,
        "epoch": epoch,
        "world_size": world,
        "preempted": preempted,
        "final_metrics": last_metrics,
        "run_dir": run_dir,
        "run_id": tracker.run_id,
    }
    recorder.write()
    periodic.finish(preempted)  # the probes still running: bounded by eval.probe_wait_s
    if rank == 0:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        tracker.log_artifact(os.path.join(run_dir, "summary.json"))
    tracker.finish("KILLED" if preempted else "FINISHED")
    dist.barrier()
    if preempted:
        logger.warning("stopped by signal after step %d; checkpoint saved", step)
        sys.exit(PREEMPTED_EXIT_CODE)
    return summary


def _step_metrics(engine, metrics, meter, world, peak) -> dict[str, float]:  # noqa: ANN001
    out = {k: float(v) for k, v in metrics.items() if not torch.isnan(torch.as_tensor(v))}
    for name, lr in zip(("cnn", "rest"), engine.get_lr()):
        out[f"lr_{name}"] = float(lr)
    norm = engine.get_global_grad_norm()
    if norm is not None:
        out["grad_norm"] = float(norm)
    scale = getattr(engine.optimizer, "cur_scale", None)
    if scale is not None:
        out["loss_scale"] = float(scale)
    out.update(meter.summary(world, peak))
    return out


def _progress(rank: int, total: int, start: int):
    """Rank 0's progress bar: step, loss, samples/s, ETA."""
    if rank != 0:
        return lambda *args: None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(step: int, loss: float | None, samples_per_s: float | None) -> None:
        bar.n = step
        postfix = {}
        if loss is not None:  # the last logged loss (tracking.log_every)
            postfix["loss"] = f"{loss:.3f}"
        if samples_per_s:
            postfix["samples/s"] = f"{samples_per_s:.1f}"
        bar.set_postfix(postfix, refresh=False)
        bar.refresh()
        if step >= total:
            bar.close()

    return update
