"""One rank of the trainer's engine path on an in-memory batch, for tests that compare settings:
build_step -> prepare_for_engine -> deepspeed.initialize -> three steps (run it with
torch.multiprocessing.spawn; the result is saved to `out`)."""

from __future__ import annotations

import os

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def engine_steps(_: int, out: str, overrides: list[str]) -> None:
    import deepspeed

    from soho_scale.engine.deepspeed_config import prepare_for_engine
    from soho_scale.engine.distributed import setup_distributed, to_device
    from soho_scale.engine.optimizer import build_optimizer
    from soho_scale.engine.phases import PhaseClock
    from soho_scale.engine.step import build_step
    from soho_scale.spec import load_job
    from tests.model.helpers import make_batch

    setup_distributed()
    job = load_job(
        os.path.join(REPO, "jobs/demo/pretrain.yaml"),
        ["batch.global_batch=4", "batch.micro_batch_per_rank=4", "resources.procs_per_node=1",
         *overrides],
    )  # fmt: skip
    torch.manual_seed(0)
    step = build_step(job)
    config, dtype = prepare_for_engine(step, job, 1)  # as train() does
    engine, *_ = deepspeed.initialize(
        model=step, optimizer=build_optimizer(step, job.optim), config=config
    )
    batch = to_device(make_batch(), engine.device, dtype)
    clock = PhaseClock(engine.device).attach(engine.module.model)  # as train() times its steps
    losses = []
    torch.manual_seed(1)  # dropout and the objective's sampling: the same in every run
    for _ in range(3):
        with clock.span("forward"):
            loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
        clock.step_done()
        losses.append(float(loss))
    dictionary = engine.module.model.soho.dictionary
    optimizer = engine.optimizer
    shared = [  # ZeRO-3: is the optimizer's fp32 partition the weight partition itself?
        fp32.data_ptr() == weights.data_ptr()
        for fp32, weights in zip(getattr(optimizer, "fp32_partitioned_groups_flat", []),
                                 getattr(optimizer, "fp16_partitioned_groups_flat", []))
    ]  # fmt: skip
    torch.save({"losses": losses, "vd_dtype": str(dictionary.embed.dtype),
                "param_dtype": str(next(engine.module.parameters()).dtype),
                "fp32_is_the_partition": shared, "phases": clock.collect()}, out)  # fmt: skip
