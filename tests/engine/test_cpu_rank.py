"""CPU-rank settings: ZeRO-1/2 config adjustments and the allocator policy."""

from __future__ import annotations

import os
import platform

import pytest

from soho_scale.engine.cpu_rank import keep_freed_memory
from soho_scale.engine.deepspeed_config import tune_for_cpu


@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_on_cpu_reduce_the_contiguous_bucket_in_place(stage: int) -> None:
    config = {"zero_optimization": {"stage": stage, "overlap_comm": True, "reduce_scatter": True}}
    out = tune_for_cpu(config)
    assert out is config
    assert config["zero_optimization"]["overlap_comm"] is False
    assert config["zero_optimization"]["reduce_scatter"] is False


@pytest.mark.parametrize("stage", [0, 3])
def test_other_stages_are_left_alone(stage: int) -> None:
    zero = {"stage": stage, "overlap_comm": True}
    tune_for_cpu({"zero_optimization": zero})
    assert zero == {"stage": stage, "overlap_comm": True}


def test_allocator_left_alone_when_the_user_tunes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert keep_freed_memory() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert keep_freed_memory() is True
