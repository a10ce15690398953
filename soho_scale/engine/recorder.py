"""What a rank trained on, for the resume tests: the sample ids of every batch and the loss of
every optimizer step, written to `record_rank<R>_from<STEP>.json` in the run folder. Switched on
by the spec (`tracking.record_samples`); otherwise the trainer gets a `NullRecorder`. Reading the
loss every step synchronises the device, so production runs leave it off."""

from __future__ import annotations

import json
import os

import torch


class NullRecorder:
    def batch(self, batch: dict[str, torch.Tensor]) -> None: ...
    def step(self, loss: torch.Tensor) -> None: ...
    def write(self) -> None: ...


class SampleRecorder:
    def __init__(self, run_dir: str, rank: int, start_step: int):
        self.path = os.path.join(run_dir, f"record_rank{rank}_from{start_step}.json")
        self.start_step = start_step
        self.losses: list[float] = []
        self.samples: list[int] = []

    def batch(self, batch: dict[str, torch.Tensor]) -> None:
        self.samples += batch["sample_ids"].tolist()

    def step(self, loss: torch.Tensor) -> None:
        self.losses.append(float(loss.detach()))

    def write(self) -> None:
        with open(self.path, "w") as f:
            json.dump(
                {"start_step": self.start_step, "losses": self.losses, "samples": self.samples}, f
            )


def make_recorder(
    on: bool, run_dir: str, rank: int, start_step: int
) -> SampleRecorder | NullRecorder:
    return SampleRecorder(run_dir, rank, start_step) if on else NullRecorder()
