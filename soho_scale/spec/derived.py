"""Numbers that follow from a job spec, computed here and nowhere else: accumulation steps,
steps per epoch, total steps, decay milestones in steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from soho_scale.spec.errors import SpecError

if TYPE_CHECKING:
    from soho_scale.spec.schema import Job


def accumulation_steps(job: Job, world_size: int) -> int:
    """Micro-batches per optimizer step: global_batch / (micro_batch_per_rank * world_size)."""
    per_pass = job.batch.micro_batch_per_rank * world_size
    if job.batch.global_batch % per_pass:
        raise SpecError(
            f"batch.global_batch: {job.batch.global_batch} is not divisible by "
            f"micro_batch_per_rank*world_size={per_pass}"
        )
    return job.batch.global_batch // per_pass


def derived(job: Job, num_samples: int | None = None, world_size: int | None = None) -> dict:
    """The numbers that follow from the spec; steps need `num_samples` when counted in epochs.

    An epoch is num_samples // global_batch optimizer steps (the incomplete last batch is dropped).
    """
    world = world_size or job.resources.nodes * job.resources.procs_per_node
    steps_per_epoch = None
    if num_samples is not None:
        if num_samples < job.batch.global_batch:
            raise SpecError(
                f"batch.global_batch: {job.batch.global_batch} is more than the "
                f"{num_samples} samples of the data streams"
            )
        steps_per_epoch = num_samples // job.batch.global_batch
    schedule = job.schedule
    total_steps = schedule.steps
    if schedule.epochs is not None and steps_per_epoch is not None:
        total_steps = schedule.epochs * steps_per_epoch
    decay_steps: list[int] | None = list(schedule.decay_steps)
    if schedule.decay_epochs:
        decay_steps = None
        if steps_per_epoch is not None:
            decay_steps = [e * steps_per_epoch for e in schedule.decay_epochs]
    return {
        "world_size": world,
        "micro_batch_per_rank": job.batch.micro_batch_per_rank,
        "accumulation_steps": accumulation_steps(job, world),
        "global_batch": job.batch.global_batch,
        "texts_per_step": job.batch.global_batch
        * (job.data.captions_per_image if job.data.task == "pretrain" else 1),
        "num_samples": num_samples,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "warmup_steps": schedule.warmup_steps,
        "decay_steps": decay_steps,
    }
