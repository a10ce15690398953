"""The logged step metrics are means over every micro-batch and every rank (MetricMeans)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_pipeline.loopback import free_port
from soho_scale.engine.telemetry import MetricMeans


def _rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    means = MetricMeans(torch.device("cpu"))
    # two micro-batches per step (accumulation 2) on each rank
    means.add({"loss": torch.tensor(1.0 + rank), "acc": torch.tensor(math.nan), "n": 3})
    means.add({"loss": torch.tensor(3.0 + rank), "acc": torch.tensor(0.5 * rank)})
    first = means.mean_over_ranks()
    means.add({"loss": torch.tensor(10.0)})  # the next logging window starts afresh
    second = means.mean_over_ranks({"skipped_samples": 2 + rank})  # counts: summed over ranks
    if rank == 0:
        torch.save({"first": first, "second": second}, out)
    dist.destroy_process_group()


def test_means_over_micro_batches_and_ranks(tmp_path):
    out = str(tmp_path / "means.pt")
    mp.spawn(_rank, args=(free_port(), out), nprocs=2)
    result = torch.load(out)
    # loss: (1 + 3) on rank 0, (2 + 4) on rank 1 -> 10 / 4; acc: NaN left out -> (0 + 0.5) / 2
    assert result["first"] == {"loss": 2.5, "acc": 0.25, "n": 3.0}
    assert result["second"] == {"loss": 10.0, "skipped_samples": 5.0}
