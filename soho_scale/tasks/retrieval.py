"""Image-text retrieval: Recall@K, the fine-tuning step (ITM with in-batch hard negatives) and
the retrieval model. Evaluation (exact / two-stage ranking over all pairs) lives in
`soho_scale.tasks.retrieval_eval`.

Recall ties count against the model: the rank of a positive is the number of negatives scoring
at least as high, so a constant score matrix gets recall ~0, never 100.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from soho_scale.model.config import SohoConfig
from soho_scale.model.soho import Soho
from soho_scale.objectives import (
    contrastive_loss,
    decoded_pairs,
    loss_mean,
    text_positives,
    valid_mean,
)

# Comparisons are done on blocks of rows/columns to bound memory for 5K x 25K matrices.
_BLOCK = 1024


def recall_at_k(
    scores: torch.Tensor | np.ndarray,
    text_to_image: torch.Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Text retrieval (`tr_r{k}`, image -> texts) and image retrieval (`ir_r{k}`, text -> image)
    recall in percent.

    scores: (num_images, num_texts), higher = more similar. text_to_image[t]: the image of text t.
    An image is a hit at k when any of its texts is ranked within the top k texts.
    """
    scores = torch.as_tensor(scores)
    owner = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long)
    if scores.ndim != 2:
        raise ValueError(
            f"retrieval: scores must be (num_images, num_texts), got {tuple(scores.shape)}"
        )
    num_images, num_texts = scores.shape
    if not num_images or not num_texts:
        raise ValueError(f"retrieval: empty score matrix {tuple(scores.shape)}")
    if owner.shape != (num_texts,):
        raise ValueError(
            f"retrieval: text_to_image has {owner.numel()} entries for {num_texts} texts"
        )
    if num_texts and (owner.min() < 0 or owner.max() >= num_images):
        raise ValueError(
            f"retrieval: text_to_image holds an image index outside 0..{num_images - 1}"
        )
    if torch.isnan(scores).any():
        raise ValueError("retrieval: scores contain NaN")
    counts = torch.bincount(owner, minlength=num_images)
    if (counts == 0).any():
        first = int((counts == 0).nonzero()[0])
        raise ValueError(f"retrieval: image {first} has no text; every image needs at least one")

    image_rank = torch.empty(num_images, dtype=torch.long)  # negatives >= best positive text
    for start in range(0, num_images, _BLOCK):
        block = scores[start : start + _BLOCK]  # (b, T)
        rows = torch.arange(start, start + block.shape[0]).unsqueeze(1)
        positive = owner.unsqueeze(0) == rows  # (b, T)
        best = block.masked_fill(~positive, float("-inf")).max(dim=1).values  # (b,)
        image_rank[start : start + block.shape[0]] = ((block >= best[:, None]) & ~positive).sum(1)

    text_rank = torch.empty(num_texts, dtype=torch.long)  # other images >= the text's image
    for start in range(0, num_texts, _BLOCK):
        block = scores[:, start : start + _BLOCK]  # (I, b)
        mine = owner[start : start + block.shape[1]]
        positive_score = block.gather(0, mine.unsqueeze(0))  # (1, b)
        # the positive itself is always >= itself: subtract it
        text_rank[start : start + block.shape[1]] = (block >= positive_score).sum(0) - 1

    result = {}
    for k in ks:
        result[f"tr_r{k}"] = 100.0 * (image_rank < k).double().mean().item()
    for k in ks:
        result[f"ir_r{k}"] = 100.0 * (text_rank < k).double().mean().item()
    return result


# ----------------------------------------------------------------------------------------------
# Fine-tuning: ITM with hard negatives mined inside the batch.


class RetrievalModel(nn.Module):
    """The SOHO backbone and the ITM head; names match `SohoPretrain` so pre-trained ITM loads."""

    def __init__(self, config: SohoConfig):
        super().__init__()
        self.config = config
        self.soho = Soho(config)
        self.itm_head = nn.Linear(config.hidden_size, 2)

    def match_score(self, pooled: torch.Tensor) -> torch.Tensor:
        """(P, D) pooled [CLS] -> (P,) float log-odds of "match" (the ranking score)."""
        logits = self.itm_head(pooled).float()
        # The log-odds, not the softmax probability: the probability saturates to exactly 1.0 in
        # fp32 for confident pairs, and ties count against the model in recall_at_k.
        return logits[:, 1] - logits[:, 0]


def mine_hard_negatives(
    scores: torch.Tensor, positives: torch.Tensor, num: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The highest-scoring wrong pairs: for each text its `num` best wrong images, for each image
    its `num` best wrong texts.

    scores, positives: (T, B). Returns (text, image) index pairs, each (P, 2) long: first the image
    negatives of every text, then the text negatives of every image; a text (image) with fewer
    than `num` wrong candidates gets only those.
    """
    masked = scores.float().masked_fill(positives, float("-inf"))
    pairs = []
    for dim in (1, 0):  # 1: images per text; 0: texts per image
        count = min(num, masked.shape[dim])
        if count == 0:
            pairs.append(torch.zeros(0, 2, dtype=torch.long, device=scores.device))
            continue
        values, picks = masked.topk(count, dim=dim)  # (T, n) or (n, B)
        keep = torch.isfinite(values)
        if dim == 1:
            texts = torch.arange(masked.shape[0], device=scores.device)[:, None].expand_as(picks)
            pairs.append(torch.stack([texts[keep], picks[keep]], dim=1))
        else:
            images = torch.arange(masked.shape[1], device=scores.device)[None, :].expand_as(picks)
            pairs.append(torch.stack([picks[keep], images[keep]], dim=1))
    return pairs[0], pairs[1]


class RetrievalStep(nn.Module):
    """What the trainer wraps for task "retrieval": forward(batch) -> (loss, metrics).

    Batches are caption batches (`images`, `image_sizes`, `text_ids`, `text_mask`,
    `text_image_index`). The CNN runs once per image. Every caption is scored with ITM against
    every image of the (per-rank) batch under no_grad, dropout off; the loss is binary ITM
    cross-entropy over the true pairs plus, per caption, its `hard_negatives` best-scoring wrong
    images and, per image, its `hard_negatives` best-scoring wrong captions (UNITER/ALBEF-style
    in-batch hard negatives). Mining costs T x B no-grad pair forwards: keep micro-batches and
    captions per image moderate. `itc_weight` > 0 (the job's `objectives.itc_weight`) adds the
    in-batch contrastive term of `soho_scale.objectives` (not in the paper): it aligns the first
    stage of two-stage evaluation and, through the shared encoder, speeds up ITM. An image that
    did not decode (`sample_valid` False) and its captions are neither scored nor mined.
    """

    def __init__(
        self,
        model: RetrievalModel,
        hard_negatives: int = 1,
        itc_weight: float = 0.0,
        itc_temperature: float = 0.05,
    ):
        super().__init__()
        self.model = model
        self.hard_negatives = hard_negatives
        self.itc_weight = itc_weight
        self.itc_temperature = itc_temperature

    @torch.no_grad()
    def pair_scores(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """ITM log-odds of every (text, image) pair of the batch: (T, B), dropout off."""
        fusion = self.model.soho.fusion
        was_training = fusion.training
        fusion.eval()
        try:
            count, images = text_ids.shape[0], embeds.shape[0]
            texts = torch.arange(count, device=text_ids.device).repeat_interleave(images)
            rows = torch.arange(images, device=text_ids.device).repeat(count)
            _, pooled = self.model.soho.fuse(
                text_ids[texts], text_mask[texts], embeds[rows], mask[rows]
            )
            return self.model.match_score(pooled).view(count, images)
        finally:
            fusion.train(was_training)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        soho = self.model.soho
        image_valid = batch.get("sample_valid")
        visual = soho.encode_image(  # CNN once per image
            batch["images"], batch["image_sizes"], image_valid=image_valid
        )
        # An all-False MVM mask changes nothing but gives the mask embedding a (zero) gradient:
        # ZeRO expects a gradient for every parameter.
        embeds = soho.embed_visual(visual, torch.zeros_like(visual.mask))  # (B, N, D)
        text_ids, text_mask = batch["text_ids"], batch["text_mask"]
        owner = batch["text_image_index"]
        num_images = embeds.shape[0]

        positives = text_positives(text_ids, owner, num_images)  # (T, B)
        scores = self.pair_scores(text_ids, text_mask, embeds.detach(), visual.mask)
        text_valid, decoded = decoded_pairs(image_valid, owner)
        scored, excluded = positives, positives
        if decoded is not None:
            scored, excluded = positives & decoded, positives | ~decoded
        image_negatives, text_negatives = mine_hard_negatives(scores, excluded, self.hard_negatives)
        texts = torch.cat([torch.arange(len(owner), device=owner.device), image_negatives[:, 0],
                           text_negatives[:, 0]])  # fmt: skip
        rows = torch.cat([owner, image_negatives[:, 1], text_negatives[:, 1]])
        labels = torch.zeros(len(texts), dtype=torch.long, device=owner.device)
        labels[: len(owner)] = 1
        _, pooled = soho.fuse(text_ids[texts], text_mask[texts], embeds[rows], visual.mask[rows])
        logits = self.model.itm_head(pooled).float()  # (P, 2)
        # Mined negatives pair decoded images and captions only; a true pair counts if it decoded.
        pair_valid = None
        if text_valid is not None:
            pair_valid = torch.ones(len(texts), dtype=torch.bool, device=owner.device)
            pair_valid[: len(owner)] = text_valid
        itm_loss = loss_mean(F.cross_entropy(logits, labels, reduction="none"), pair_valid)
        loss = itm_loss
        metrics = {}
        if self.itc_weight > 0:
            itc_loss, _ = contrastive_loss(
                soho, text_ids, text_mask, embeds, visual.mask, owner, self.itc_temperature,
                image_valid,
            )  # fmt: skip
            loss = loss + self.itc_weight * itc_loss
            metrics["itc_loss"] = itc_loss.detach()
        with torch.no_grad():
            metrics.update(
                loss=loss.detach(),
                itm_loss=itm_loss.detach(),
                itm_acc=valid_mean((logits.argmax(-1) == labels).float(), pair_valid),
                positive_score=scores[scored].mean() if scored.any() else scores.new_zeros(()),
                hard_negative_score=torch.cat([scores[image_negatives[:, 0], image_negatives[:, 1]],
                                               scores[text_negatives[:, 0], text_negatives[:, 1]]])
                .mean() if len(texts) > len(owner) else scores.new_zeros(()),
            )  # fmt: skip
        return loss, metrics
