"""patches/deepspeed_zero3.py: ZeRO-3 in fp32 without a second fp32 copy of the weights."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from soho_scale.engine.patches.deepspeed_zero3 import PATCH
from tests.engine.engine_steps import engine_steps


def test_version_in_tested_range():
    assert PATCH.version_problem() is None


def test_fingerprints_unchanged():
    assert PATCH.fingerprint_problems() == []


def _zero3(tmp_path, name: str) -> dict:
    out = str(tmp_path / f"{name}.pt")
    mp.spawn(engine_steps, args=(out, ["deepspeed.zero_stage=3"]), nprocs=1, join=True)
    return torch.load(out)


@pytest.mark.multiprocess
def test_behaviour_one_copy_of_the_weights_and_the_losses_of_zero0(tmp_path):
    out = str(tmp_path / "zero0.pt")
    mp.spawn(engine_steps, args=(out, ["deepspeed.zero_stage=0"]), nprocs=1, join=True)
    zero0, zero3 = torch.load(out), _zero3(tmp_path, "zero3")
    assert zero3["fp32_is_the_partition"] and all(zero3["fp32_is_the_partition"])
    assert zero3["losses"] == pytest.approx(zero0["losses"], rel=1e-5, abs=1e-6)
    assert zero3["losses"][-1] != zero3["losses"][0]


@pytest.mark.multiprocess
def test_still_needed_deepspeed_copies_fp32_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("SOHO_DISABLE_PATCHES", PATCH.name)  # read by the spawned rank
    copies = _zero3(tmp_path, "upstream")["fp32_is_the_partition"]
    assert copies, "no fp32 partitions found: revise the test"
    if all(copies):
        pytest.fail(f"upstream changed: DeepSpeed shares fp32 partitions; delete {PATCH.module}")
    assert not any(copies)
