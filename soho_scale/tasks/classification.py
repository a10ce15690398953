"""The training step of the classification tasks (NLVR2, SNLI-VE): cross-entropy on the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from soho_scale.objectives import loss_mean, valid_mean


class ClassificationStep(nn.Module):
    """What the trainer wraps: forward(batch) -> (loss, {"loss", "acc"}); `model(batch)` gives
    (B, classes) logits and `batch["labels"]` the gold classes. Samples whose image did not
    decode (`sample_valid` False) are left out of the loss and the accuracy."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logits = self.model(batch).float()
        valid = batch.get("sample_valid")
        loss = loss_mean(F.cross_entropy(logits, batch["labels"], reduction="none"), valid)
        with torch.no_grad():
            acc = valid_mean((logits.argmax(1) == batch["labels"]).float(), valid)
        return loss, {"loss": loss.detach(), "acc": acc}
