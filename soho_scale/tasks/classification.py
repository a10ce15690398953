"""The training step of the classification tasks (NLVR2, SNLI-VE): cross-entropy on the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassificationStep(nn.Module):
    """What the trainer wraps: forward(batch) -> (loss, {"loss", "acc"}); `model(batch)` gives
    (B, classes) logits and `batch["labels"]` the gold classes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logits = self.model(batch).float()
        loss = F.cross_entropy(logits, batch["labels"])
        with torch.no_grad():
            acc = (logits.argmax(1) == batch["labels"]).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc}
