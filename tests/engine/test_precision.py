"""The DeepSpeed engine on CPU: bf16 trains with an fp32 visual dictionary; activation
checkpointing changes nothing but memory."""

import pytest
import torch
import torch.multiprocessing as mp

from tests.engine.engine_steps import engine_steps


@pytest.mark.multiprocess
def test_bf16_engine_trains_with_fp32_dictionary(tmp_path):
    out = str(tmp_path / "result.pt")
    mp.spawn(engine_steps, args=(out, ["precision=bf16"]), nprocs=1, join=True)
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
        mp.spawn(engine_steps, args=(out, overrides), nprocs=1, join=True)
        runs[flag] = torch.load(out)["losses"]
    # recomputed activations (dropout RNG restored) -> same gradients -> same next losses
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-5, abs=1e-6), runs
    assert runs["false"][-1] != runs["false"][0]  # the steps really changed the model
