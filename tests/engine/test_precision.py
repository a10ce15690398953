"""bf16 under the DeepSpeed engine on CPU: trains, and the visual dictionary stays fp32."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from soho_scale.spec import load_job

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bf16_steps(_: int, out: str) -> None:
    import deepspeed

    from soho_scale.engine.optimizer import build_optimizer
    from soho_scale.engine.trainer import _to_device, build_step, setup_distributed
    from soho_scale.spec import build_deepspeed_config
    from tests.model.helpers import make_batch

    setup_distributed()
    job = load_job(
        os.path.join(REPO, "jobs/demo/pretrain.yaml"),
        ["precision=bf16", "batch.global_batch=4", "batch.micro_batch_per_rank=4",
         "resources.procs_per_node=1"],
    )  # fmt: skip
    step = build_step(job).to(torch.bfloat16)  # as train() does before deepspeed.initialize
    engine, *_ = deepspeed.initialize(
        model=step,
        optimizer=build_optimizer(step, job.optim),
        config=build_deepspeed_config(job, 1),
    )
    batch = _to_device(make_batch(), engine.device, torch.bfloat16)
    losses = []
    for _ in range(3):
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    dictionary = engine.module.model.soho.dictionary
    torch.save({"losses": losses, "vd_dtype": str(dictionary.embed.dtype),
                "param_dtype": str(next(engine.module.parameters()).dtype)}, out)  # fmt: skip


@pytest.mark.multiprocess
def test_bf16_engine_trains_with_fp32_dictionary(tmp_path):
    out = str(tmp_path / "result.pt")
    mp.spawn(_bf16_steps, args=(out,), nprocs=1, join=True)
    result = torch.load(out)
    assert result["param_dtype"] == "torch.bfloat16"
    assert result["vd_dtype"] == "torch.float32"
    assert all(torch.isfinite(torch.tensor(result["losses"])))
