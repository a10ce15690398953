"""Two gloo ranks with different data end with the same dictionary as one process with all data."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_pipeline.loopback import free_port
from soho_scale.model.dictionary import VisualDictionary


def _make_dictionary() -> VisualDictionary:
    torch.manual_seed(0)
    return VisualDictionary(
        size=16, dim=8, decay=0.9, decay_start=0.5, decay_warmup_steps=2
    ).train()


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(40, 8, generator=g) for _ in range(3)]  # 3 update steps


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    vd = _make_dictionary()
    for step in _data():
        half = step[rank * 20 : (rank + 1) * 20]  # each rank sees a different half
        vd(half)
    torch.save(vd.state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_ranks_hold_identical_dictionaries_equal_to_one_process(tmp_path):
    port = free_port()
    mp.spawn(_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    single = _make_dictionary()
    for step in _data():
        single(step)
    for key, value in single.state_dict().items():
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6)
    assert rank0["num_updates"].item() == 3
