"""The DeepSpeed engine on CPU: bf16 trains with an fp32 visual dictionary; activation
checkpointing changes nothing but memory; ZeRO-3 in fp32 holds one copy of the weights."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from soho_scale.spec import load_job

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _engine_steps(_: int, out: str, overrides: list[str]) -> None:
    import deepspeed

    from soho_scale.engine.optimizer import build_optimizer
    from soho_scale.engine.trainer import (
        _to_device,
        build_step,
        prepare_for_engine,
        setup_distributed,
    )
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
    batch = _to_device(make_batch(), engine.device, dtype)
    losses = []
    torch.manual_seed(1)  # dropout and the objective's sampling: the same in every run
    for _ in range(3):
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
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
                "fp32_is_the_partition": shared}, out)  # fmt: skip


@pytest.mark.multiprocess
def test_bf16_engine_trains_with_fp32_dictionary(tmp_path):
    out = str(tmp_path / "result.pt")
    mp.spawn(_engine_steps, args=(out, ["precision=bf16"]), nprocs=1, join=True)
    result = torch.load(out)
    assert result["param_dtype"] == "torch.bfloat16"
    assert result["vd_dtype"] == "torch.float32"
    assert all(torch.isfinite(torch.tensor(result["losses"])))


@pytest.mark.multiprocess
def test_activation_checkpointing_under_the_engine_gives_the_same_losses(tmp_path):
    runs = {}
    for flag in ("false", "true"):
        out = str(tmp_path / f"{flag}.pt")
        overrides = [f"model.overrides.activation_checkpointing={flag}"]
        mp.spawn(_engine_steps, args=(out, overrides), nprocs=1, join=True)
        runs[flag] = torch.load(out)["losses"]
    # recomputed activations (dropout RNG restored) -> same gradients -> same next losses
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-5, abs=1e-6), runs
    assert runs["false"][-1] != runs["false"][0]  # the steps really changed the model


@pytest.mark.multiprocess
def test_zero3_in_fp32_keeps_one_copy_of_the_weights_and_trains_like_zero0(tmp_path):
    # DeepSpeed compares a torch.device with a device name there and always copied (zero3.py).
    runs = {}
    for stage in (0, 3):
        out = str(tmp_path / f"zero{stage}.pt")
        mp.spawn(_engine_steps, args=(out, [f"deepspeed.zero_stage={stage}"]), nprocs=1, join=True)
        runs[stage] = torch.load(out)
    assert runs[3]["fp32_is_the_partition"] and all(runs[3]["fp32_is_the_partition"])
    assert runs[3]["losses"] == pytest.approx(runs[0]["losses"], rel=1e-5, abs=1e-6), runs
    assert runs[3]["losses"][-1] != runs[3]["losses"][0]
