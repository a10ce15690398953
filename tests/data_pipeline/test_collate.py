"""Batch collation: padding with exact sizes, text-to-image indexing, per-task keys."""

from __future__ import annotations

import torch

from data_pipeline.collate import collate_captions, collate_nlvr2, collate_vqa


def sample(i, h, w, captions=2, **extra):
    return {
        "sample_id": i,
        "valid": True,
        "image": torch.ones(3, h, w),
        "text_ids": torch.full((captions, 6), i),
        "text_mask": torch.ones(captions, 6).long(),
        **extra,
    }


def test_mixed_landscape_portrait_padding_and_sizes():
    batch = collate_captions([sample(0, 32, 48), sample(1, 48, 32, captions=3)])
    assert list(batch)[0] == "sample_ids"  # StreamingDataLoader counts the first value
    assert batch["images"].shape == (2, 3, 48, 48)
    assert batch["image_sizes"].tolist() == [[32, 48], [48, 32]]
    assert (
        batch["images"][0, :, 32:].abs().sum() == 0
        and batch["images"][1, :, :, 32:].abs().sum() == 0
    )
    assert batch["images"][0, :, :32, :48].eq(1).all()
    assert batch["text_image_index"].tolist() == [0, 0, 1, 1, 1]
    assert batch["text_ids"][:, 0].tolist() == [0, 0, 1, 1, 1]


def test_vqa_and_nlvr2_keys():
    vqa = collate_vqa([sample(0, 8, 8, 1, targets=torch.tensor([0.0, 1.0]), question_id=7)])
    assert vqa["targets"].shape == (1, 2) and vqa["question_ids"].tolist() == [7]
    pair = {"image_left": torch.ones(3, 8, 16), "image_right": torch.ones(3, 16, 8), "label": 1}
    one = {k: v for k, v in sample(5, 8, 8, 1).items() if k != "image"}
    nlvr2 = collate_nlvr2([{**one, **pair}, {**one, **pair, "label": 0}])
    assert nlvr2["images"].shape == (4, 3, 16, 16)
    assert nlvr2["image_sizes"].tolist() == [[8, 16], [16, 8]] * 2
    assert nlvr2["labels"].tolist() == [1, 0] and nlvr2["text_image_index"].tolist() == [0, 2]
