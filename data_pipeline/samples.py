"""Raw MDS samples -> tensors for each task: decode and resize the image(s), pick and tokenise
the captions, MLM-mask pre-training captions, build the task's targets. Runs in the data loader
workers; a pure function of (raw sample, sample id, epoch, seed), so a resumed run sees the same
tensors as the uninterrupted one.

An image that fails to decode is replaced by a blank image (`valid` False), never dropped, so all
ranks keep the same number of batches; the loader counts them (`SohoLoader.skipped`) and the
training steps leave them out of every loss (`soho_scale.objectives.valid_mean`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from data_pipeline.collate import COLLATE_BY_TASK
from data_pipeline.errors import DataError
from data_pipeline.masking import mask_captions
from data_pipeline.transforms import ImageDecodeError, ImageTransform, TextTransform, blank_image

TASKS = tuple(COLLATE_BY_TASK)


@dataclass
class SampleProcessor:
    """Raw MDS sample -> tensors for one task (runs in the DataLoader workers)."""

    task: str
    image: ImageTransform = field(default_factory=ImageTransform)
    text: TextTransform = field(default_factory=TextTransform)
    captions_per_image: int = 4
    mlm_probability: float = 0.15
    seed: int = 0
    num_answers: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DataError(f"task {self.task!r}: unknown, use one of {', '.join(TASKS)}")

    def images(self, raw: dict[str, Any], columns: Sequence[str]) -> tuple[list, bool]:
        try:
            return [self.image(raw[c]) for c in columns], True
        except ImageDecodeError:
            return [blank_image(*self.image.stand_in_size()) for _ in columns], False

    def pick_captions(self, captions: list[str], epoch: int, sample_id: int) -> list[str]:
        """`captions_per_image` captions, a pure function of (seed, epoch, sample id)."""
        rng = random.Random(f"{self.seed}:{epoch}:{sample_id}:captions")
        order = rng.sample(range(len(captions)), len(captions))
        return [captions[order[i % len(order)]] for i in range(self.captions_per_image)]

    def __call__(self, raw: dict[str, Any], sample_id: int, epoch: int) -> dict[str, Any]:
        columns = ["image_left", "image_right"] if self.task == "nlvr2" else ["image"]
        images, valid = self.images(raw, columns)
        out: dict[str, Any] = {"sample_id": sample_id, "valid": valid}
        if self.task == "nlvr2":
            out["image_left"], out["image_right"] = images
        else:
            out["image"] = images[0]

        if self.task in ("pretrain", "retrieval"):
            texts = self.pick_captions(list(raw["captions"]), epoch, sample_id)
        elif self.task == "vqa":
            texts = [raw["question"]]
        elif self.task == "nlvr2":
            texts = [raw["sentence"]]
        else:
            texts = [raw["hypothesis"]]
        out["text_ids"], out["text_mask"] = self.text(texts)

        if self.task == "pretrain":
            special = self.text.special_ids()
            ids = out["text_ids"]
            is_special = (out["text_mask"] == 0) | (ids == special["cls"]) | (ids == special["sep"])
            out["text_ids"], out["mlm_labels"] = mask_captions(
                ids,
                is_special,
                self.seed,
                epoch,
                sample_id,
                special["mask"],
                special["vocab_size"],
                self.mlm_probability,
            )
        elif self.task == "vqa":
            targets = torch.zeros(self.num_answers)
            for label, score in zip(raw["answer_labels"], raw["answer_scores"]):
                targets[label] = score
            out["targets"] = targets
            out["question_id"] = int(raw["question_id"])
        if self.task in ("nlvr2", "snli_ve"):
            out["label"] = int(raw["label"])
        return out
