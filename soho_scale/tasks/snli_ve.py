"""SNLI-VE: does the image entail, leave open or contradict a hypothesis? 3 classes on [CLS].

SOHO released no SNLI-VE code; the head follows UNITER's: Linear(H, 2H) -> GELU -> LayerNorm ->
Linear(2H, 3), cross-entropy. Labels: 0 entailment, 1 neutral, 2 contradiction. Metric: accuracy
(val, test).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from soho_scale.model.config import SohoConfig
from soho_scale.model.soho import Soho
from soho_scale.tasks.visual import fuse_texts_with_images

LABELS = ("entailment", "neutral", "contradiction")


class SNLIVEModel(nn.Module):
    def __init__(self, config: SohoConfig):
        super().__init__()
        self.config = config
        self.soho = Soho(config)
        hidden = config.hidden_size
        self.head = nn.Sequential(
            nn.Linear(hidden, 2 * hidden),
            nn.GELU(),
            nn.LayerNorm(2 * hidden, eps=1e-12),
            nn.Linear(2 * hidden, len(LABELS)),
        )

    def forward(self, batch: dict[str, torch.Tensor], batch_independent: bool = False):
        """batch: images, image_sizes, text_ids, text_mask, text_image_index -> logits (B, 3)."""
        pooled = fuse_texts_with_images(
            self.soho,
            batch["images"],
            batch["image_sizes"],
            batch["text_ids"],
            batch["text_mask"],
            batch["text_image_index"],
            batch_independent,
            batch.get("sample_valid"),
        )
        return self.head(pooled)


class SNLIVEEvaluation:
    """Accuracy in percent (also per gold label); predictions with their pair ids."""

    keep_columns = ("pair_id",)

    def predict(self, model: SNLIVEModel, batch: dict) -> list[dict]:
        predicted = model(batch, batch_independent=True).argmax(1).tolist()
        return [
            {
                "sample_id": int(sample_id),
                "pair_id": kept["pair_id"],
                "prediction": int(p),
                "label": int(label),
            }
            for sample_id, p, label, kept in zip(
                batch["sample_ids"].tolist(), predicted, batch["labels"].tolist(), batch["kept"]
            )
        ]

    def score(self, records: list[dict]) -> dict[str, float]:
        metrics = {
            "accuracy": 100.0 * sum(r["prediction"] == r["label"] for r in records) / len(records)
        }
        for index, name in enumerate(LABELS):
            of_label = [r for r in records if r["label"] == index]
            if of_label:
                hits = sum(r["prediction"] == index for r in of_label)
                metrics[f"accuracy_{name}"] = 100.0 * hits / len(of_label)
        return metrics

    def write_outputs(self, records: list[dict], out_dir: str, split: str) -> list[str]:
        path = os.path.join(out_dir, "predictions.json")
        rows = [
            {
                "pair_id": r["pair_id"],
                "prediction": LABELS[r["prediction"]],
                "label": LABELS[r["label"]],
            }
            for r in records
        ]
        with open(path, "w") as f:
            json.dump(rows, f)
        return [path]
