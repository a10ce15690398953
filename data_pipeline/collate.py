"""Batch collation: per-sample dicts from data_pipeline.streaming -> one dict of tensors.

Every batch key, for every task (B = image samples in the batch, T = text rows, L = max_len,
H/W = largest image height/width in the batch):

| key | dtype | shape | tasks | meaning |
|---|---|---|---|---|
| sample_ids | long | (B,) | all | dataset index of each sample (exactly-once checks, MLM seeds) |
| images | uint8 | (B, 3, H, W) | all but nlvr2 | RGB, zero-padded bottom/right (the model normalises) |
| images | uint8 | (2B, 3, H, W) | nlvr2 | rows 2i and 2i+1: left and right image of statement i |
| image_sizes | long | (B, 2) or (2B, 2) | all | real (height, width) of each image row before padding |
| text_ids | long | (T, L) | all | token ids ([CLS] ... [SEP] [PAD]...); MLM-masked in pretrain |
| text_mask | long | (T, L) | all | 1 = real token, 0 = padding |
| text_image_index | long | (T,) | all | row in `images` of each text row (nlvr2: unused, 2i) |
| mlm_labels | long | (T, L) | pretrain | original id at masked positions, -100 elsewhere |
| sample_valid | bool | (B,) | all | False where the image failed to decode and a blank fallback image was substituted (the batch keeps its size so all ranks step together; the training steps leave the sample out) |
| targets | float32 | (B, num_answers) | vqa | soft scores: the official accuracy of each answer (0.3/0.6/0.9/1 for 1/2/3/4+ of ten humans) |
| question_ids | long | (B,) | vqa | VQA question id (for the results file) |
| labels | long | (B,) | nlvr2, snli_ve | nlvr2: 1 True / 0 False; snli_ve: 0 entail, 1 neutral, 2 contra |

Text rows per sample: pretrain and retrieval use `captions_per_image` rows per image (official
4), chosen deterministically from the sample's captions (cycled when it has fewer); vqa, nlvr2
and snli_ve have one text row per sample. `sample_ids` comes first in the dict because
streaming's StreamingDataLoader counts samples by the length of the first value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, h_i, w_i) tensors -> (N, 3, H, W) of their dtype, zero-padded bottom/right, (N, 2)
    real sizes."""
    sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images], dtype=torch.long)
    height, width = (int(v) for v in sizes.max(dim=0).values)
    batch = torch.zeros(len(images), 3, height, width, dtype=images[0].dtype)
    for row, im in enumerate(images):
        batch[row, :, : im.shape[1], : im.shape[2]] = im
    return batch, sizes


def _texts(samples: Sequence[dict[str, Any]], image_rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """Concatenate per-sample (C_i, L) text tensors; index each row to its image row."""
    counts = torch.tensor([s["text_ids"].shape[0] for s in samples], dtype=torch.long)
    out = {
        "text_ids": torch.cat([s["text_ids"] for s in samples]),
        "text_mask": torch.cat([s["text_mask"] for s in samples]),
        "text_image_index": torch.repeat_interleave(torch.tensor(image_rows), counts),
    }
    if "mlm_labels" in samples[0]:
        out["mlm_labels"] = torch.cat([s["mlm_labels"] for s in samples])
    return out


def _common(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "sample_ids": torch.tensor([s["sample_id"] for s in samples], dtype=torch.long),
        "sample_valid": torch.tensor([s["valid"] for s in samples], dtype=torch.bool),
    }


def collate_captions(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pre-training and retrieval: one image and several caption rows per sample."""
    batch = _common(samples)
    batch["images"], batch["image_sizes"] = pad_images([s["image"] for s in samples])
    batch.update(_texts(samples, list(range(len(samples)))))
    return batch


def collate_vqa(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = collate_captions(samples)
    batch["targets"] = torch.stack([s["targets"] for s in samples]).float()
    batch["question_ids"] = torch.tensor([s["question_id"] for s in samples], dtype=torch.long)
    return batch


def collate_snli_ve(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = collate_captions(samples)
    batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return batch


def collate_nlvr2(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Two images per statement: rows 2i (left) and 2i+1 (right)."""
    batch = _common(samples)
    images = [im for s in samples for im in (s["image_left"], s["image_right"])]
    batch["images"], batch["image_sizes"] = pad_images(images)
    batch.update(_texts(samples, [2 * i for i in range(len(samples))]))
    batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return batch


COLLATE_BY_TASK = {
    "pretrain": collate_captions,
    "retrieval": collate_captions,
    "vqa": collate_vqa,
    "nlvr2": collate_nlvr2,
    "snli_ve": collate_snli_ve,
}
