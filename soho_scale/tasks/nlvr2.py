"""NLVR2: is a statement true of a pair of images? Two passes, concatenated [CLS], 2 classes.

The statement is read once with the left image and once with the right one (batch rows 2i and
2i+1 of `images`); the two pooled [CLS] vectors are concatenated and classified. SOHO released no
NLVR2 code; the head follows the common recipe of its baselines (LXMERT/UNITER "pair" setting):
Linear(2H, 2H) -> GELU -> LayerNorm -> Linear(2H, 2). Metrics: accuracy and consistency (dev, test-P).
"""

from __future__ import annotations

import csv
import json
import os

import torch
from torch import nn

from data_pipeline.sources.nlvr2 import IDENTIFIERS_NAME
from soho_scale.model.config import SohoConfig
from soho_scale.model.soho import Soho
from soho_scale.tasks.visual import fuse_texts_with_images


class NLVR2Model(nn.Module):
    def __init__(self, config: SohoConfig):
        super().__init__()
        self.config = config
        self.soho = Soho(config)
        pair = 2 * config.hidden_size
        self.head = nn.Sequential(
            nn.Linear(pair, pair), nn.GELU(), nn.LayerNorm(pair, eps=1e-12), nn.Linear(pair, 2)
        )

    def forward(self, batch: dict[str, torch.Tensor], batch_independent: bool = False):
        """batch: images (2B, ...) left/right interleaved, text_ids (B, L) -> logits (B, 2)."""
        statements = batch["text_ids"].shape[0]
        # Each statement twice, in the order of its images: rows 2i (left), 2i+1 (right).
        rows = torch.arange(2 * statements, device=batch["text_ids"].device)
        pooled = fuse_texts_with_images(
            self.soho,
            batch["images"],
            batch["image_sizes"],
            batch["text_ids"].repeat_interleave(2, dim=0),
            batch["text_mask"].repeat_interleave(2, dim=0),
            rows,
            batch_independent,
            valid if (valid := batch.get("sample_valid")) is None else valid.repeat_interleave(2),
        )  # (2B, D)
        return self.head(pooled.view(statements, -1))  # (B, 2D) -> (B, 2)


# What a statement the conversion skipped (its images missing or undecodable) is answered: the
# official script refuses a prediction file that lacks a statement of the split.
FALLBACK = 1  # "True"


class NLVR2Evaluation:
    """Accuracy in percent; predictions as JSON and in the official `identifier,label` CSV.

    `published`: [identifier, label] of every statement of the evaluated split (`identifiers.json`
    beside the shards), or None (shards converted before it was written: the statements with a
    sample alone). With it, the metrics and the CSV cover the whole split in its published order;
    a statement without a sample is answered True and scored as the official script scores that.
    """

    keep_columns = ("identifier",)

    def __init__(self, published: list[list] | None = None):
        self.published = None
        if published is not None:
            ok = all(
                isinstance(item, list) and len(item) == 2 and item[1] in (0, 1, None)
                for item in published
            )
            if not ok:
                raise ValueError(
                    f"nlvr2: {IDENTIFIERS_NAME}: expected [identifier, 1|0|null] items"
                )
            firsts: dict[str, int | None] = {}
            for identifier, label in published:  # a statement listed twice counts once
                firsts.setdefault(str(identifier), label)
            self.published = list(firsts.items())

    def _whole_split(self, records: list[dict]) -> list[dict]:
        """`records` plus a fallback record for each published statement without one."""
        if self.published is None:
            return records
        have = {str(r["identifier"]) for r in records}
        missing = [
            {"identifier": i, "prediction": FALLBACK, "label": label}
            for i, label in self.published
            if i not in have
        ]
        order = {i: n for n, (i, _) in enumerate(self.published)}
        every = records + missing
        return sorted(every, key=lambda r: order.get(str(r["identifier"]), len(order)))

    def predict(self, model: NLVR2Model, batch: dict) -> list[dict]:
        predicted = model(batch, batch_independent=True).argmax(1).tolist()
        return [
            {
                "sample_id": int(sample_id),
                "identifier": kept["identifier"],
                "prediction": int(p),
                "label": int(label),
            }
            for sample_id, p, label, kept in zip(
                batch["sample_ids"].tolist(), predicted, batch["labels"].tolist(), batch["kept"]
            )
        ]

    def score(self, records: list[dict]) -> dict[str, float]:
        """Accuracy, and NLVR2's consistency when identifiers are official
        (`split-set-pair-sentence`): the share of sentences right on every pair they describe.
        Over the whole published split when it is known (`accuracy_scored`: over the statements
        with a sample alone); a split without labels (test2 as released at first) has none."""
        from data_pipeline.sources.nlvr2 import sentence_id

        metrics: dict[str, float] = {}
        every = self._whole_split(records)
        if self.published is not None:  # as VQA's: over the records alone, and how many lack one
            scored = [r["prediction"] == r["label"] for r in records]
            metrics["accuracy_scored"] = 100.0 * sum(scored) / max(len(scored), 1)
            metrics["unscored_statements"] = float(len(every) - len(records))
            if len(every) > len(records):  # said once per evaluation (write_outputs is silent)
                print(
                    f"nlvr2: {len(every) - len(records)} of {len(every)} statements had no "
                    "sample (skipped at conversion) and are answered True",
                    flush=True,
                )
        records = [r for r in every if r["label"] is not None]
        if not records:
            return metrics
        right = [r["prediction"] == r["label"] for r in records]
        metrics["accuracy"] = 100.0 * sum(right) / len(records)
        keys = [sentence_id(str(r["identifier"])) for r in records]
        if None not in keys:
            sentences: dict[str, bool] = {}
            for key, ok in zip(keys, right):
                sentences[key] = sentences.get(key, True) and ok
            metrics["consistency"] = 100.0 * sum(sentences.values()) / len(sentences)
        return metrics

    def write_outputs(self, records: list[dict], out_dir: str, split: str) -> list[str]:
        records = self._whole_split(records)
        json_path = os.path.join(out_dir, "predictions.json")
        with open(json_path, "w") as f:
            json.dump(
                [{k: r[k] for k in ("identifier", "prediction", "label")} for r in records], f
            )
        csv_path = os.path.join(out_dir, f"nlvr2_{split}_predictions.csv")
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            for r in records:
                writer.writerow([r["identifier"], "True" if r["prediction"] == 1 else "False"])
        return [json_path, csv_path]
