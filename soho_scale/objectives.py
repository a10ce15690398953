"""Pre-training objective: masked language modeling + masked visual modeling + image-text matching.

`pretrain_loss(model, batch, settings)` runs the CNN once per image, pairs every caption with its
own image or (for ITM negatives) another image of the batch, masks the visual cells of one VD word
per chosen image (MVM), and returns `(loss, metrics)`. MLM and MVM are scored on matched pairs
only; MLM's vocabulary projection runs only at masked positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from soho_scale.model.soho import SohoPretrain


@dataclass(frozen=True)
class PretrainSettings:
    itm_negative_prob: float = 0.5  # share of captions re-paired with another image
    mvm_sample_prob: float = 0.3  # share of images that get one VD word masked (official: 1.5%)
    mvm_temperature: float = 0.07  # the official code has none (loss floor ~5.6)
    mlm_weight: float = 1.0
    mvm_weight: float = 1.0
    itm_weight: float = 1.0


def pair_for_itm(
    text_image_index: torch.Tensor, num_images: int, negative_prob: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the image each caption is read with: (image rows (T,), itm labels (T,), 1 = match).

    A negative is a uniformly chosen *other* image of the batch, so the CNN never reruns.
    """
    count = text_image_index.shape[0]
    device = text_image_index.device
    if num_images < 2:
        return text_image_index, torch.ones(count, dtype=torch.long, device=device)
    negative = torch.rand(count, device=device) < negative_prob
    shift = torch.randint(1, num_images, (count,), device=device)  # never 0: another image
    other = (text_image_index + shift) % num_images
    rows = torch.where(negative, other, text_image_index)
    return rows, (~negative).long()


def choose_mvm_mask(indices: torch.Tensor, sample_prob: float) -> torch.Tensor:
    """For each chosen image, mask every cell mapped to one VD word present in it.

    indices (B, N) VD entry per cell (-1 = padding) -> (B, N) bool mask.
    """
    batch, _ = indices.shape
    chosen = torch.rand(batch, device=indices.device) < sample_prob
    valid = indices >= 0
    # Pick a random valid cell per image; its word is the one masked everywhere in that image.
    noise = torch.rand(indices.shape, device=indices.device).masked_fill(~valid, -1.0)
    pick = noise.argmax(dim=1)  # (B,)
    word = indices.gather(1, pick[:, None])  # (B, 1)
    return (indices == word) & valid & chosen[:, None] & valid.any(dim=1, keepdim=True)


def _mean_or_zero(loss_sum: torch.Tensor, count: int) -> torch.Tensor:
    # An empty selection still yields a (zero) gradient for its head: ZeRO needs every grad.
    return loss_sum / max(count, 1)


def vd_usage(indices: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Perplexity of the VD assignments in the batch and the fraction of entries used."""
    valid = indices[indices >= 0]
    counts = torch.bincount(valid, minlength=size).float()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum()
    return entropy.exp(), (counts > 0).float().mean()


def pretrain_loss(
    model: SohoPretrain, batch: dict[str, torch.Tensor], settings: PretrainSettings
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch keys: images, image_sizes, text_ids (masked), text_mask, text_image_index, mlm_labels."""
    soho = model.soho
    visual = soho.encode_image(batch["images"], batch["image_sizes"])  # CNN once per image
    num_images = batch["images"].shape[0]
    rows, itm_labels = pair_for_itm(
        batch["text_image_index"], num_images, settings.itm_negative_prob
    )

    mvm_mask = choose_mvm_mask(visual.indices, settings.mvm_sample_prob)  # (B, N)
    visual_embeds = soho.embed_visual(visual, mvm_mask)  # (B, N, D)
    hidden, pooled = soho.fuse(
        batch["text_ids"], batch["text_mask"], visual_embeds[rows], visual.mask[rows]
    )  # (T, L+N, D), (T, D)
    text_len = batch["text_ids"].shape[1]
    matched = itm_labels.bool()

    # MLM: only masked text positions of matched pairs reach the vocabulary projection.
    mlm_labels = batch["mlm_labels"].masked_fill(~matched[:, None], -100)
    mlm_positions = mlm_labels != -100  # (T, L)
    mlm_logits = model.mlm_head(hidden[:, :text_len][mlm_positions])  # (M, V)
    mlm_targets = mlm_labels[mlm_positions]
    mlm_count = int(mlm_targets.numel())
    mlm_loss = _mean_or_zero(
        F.cross_entropy(mlm_logits.float(), mlm_targets, reduction="sum"), mlm_count
    )

    # MVM: masked cells of matched pairs predict their own VD word.
    mvm_positions = mvm_mask[rows] & matched[:, None]  # (T, N)
    mvm_targets = visual.indices[rows][mvm_positions]
    mvm_logits = model.mvm_head(
        hidden[:, text_len:][mvm_positions], soho.dictionary.embed, settings.mvm_temperature
    )
    mvm_count = int(mvm_targets.numel())
    mvm_loss = _mean_or_zero(F.cross_entropy(mvm_logits, mvm_targets, reduction="sum"), mvm_count)

    itm_logits = model.itm_head(pooled).float()  # (T, 2)
    itm_loss = F.cross_entropy(itm_logits, itm_labels)

    loss = (
        settings.mlm_weight * mlm_loss
        + settings.mvm_weight * mvm_loss
        + settings.itm_weight * itm_loss
    )
    with torch.no_grad():
        perplexity, used = vd_usage(visual.indices, soho.dictionary.size)
        metrics = {
            "loss": loss.detach(),
            "mlm_loss": mlm_loss.detach(),
            "mvm_loss": mvm_loss.detach(),
            "itm_loss": itm_loss.detach(),
            "mlm_acc": _accuracy(mlm_logits, mlm_targets),
            "mvm_acc": _accuracy(mvm_logits, mvm_targets),
            "itm_acc": _accuracy(itm_logits, itm_labels),
            "mlm_count": torch.tensor(float(mlm_count)),
            "mvm_count": torch.tensor(float(mvm_count)),
            "vd_perplexity": perplexity,
            "vd_used": used,
        }
    return loss, metrics


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.numel() == 0:
        return torch.tensor(math.nan)
    return (logits.argmax(-1) == targets).float().mean()
