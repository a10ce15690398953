"""Pre-training objective: masked language modeling + masked visual modeling + image-text matching,
and an optional image-text contrastive term (ITC; not in SOHO).

`pretrain_loss(model, batch, settings)` runs the CNN once per image, pairs every caption with its
own image or (for ITM negatives) another image of the batch, masks the visual cells of one VD word
per chosen image (MVM), and returns `(loss, metrics)`. MLM and MVM are scored on matched pairs
only; MLM's vocabulary projection runs only at masked positions. A blank stand-in for an image
that did not decode (`sample_valid` False) keeps the batch's shape but takes no part: its captions
and pairs leave every loss, no caption is contrasted with it, and its cells leave the dictionary.

ITC (ALBEF's "align before fuse"): the same fusion encoder reads each caption alone and each
image alone; an in-batch InfoNCE pulls a caption's mean output towards its image's. ITM's only
signal is one bit per pair and a small transformer from scratch learns it slowly; the contrastive
signal (every caption against every image of the batch) aligns the two modalities in far fewer
steps (on the synthetic world ITM alone stays at chance for 1500 steps even with oracle colour
features, where with ITC the in-batch retrieval rises within 100: benchmarks/README.md, "Model
choices"). Its features
are also the cheap first stage of two-stage retrieval (`soho_scale.tasks.retrieval_eval`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from soho_scale.model.fusion import masked_mean
from soho_scale.model.soho import Soho, SohoPretrain


@dataclass(frozen=True)
class PretrainSettings:
    itm_negative_prob: float = 0.5  # share of captions re-paired with another image
    itm_negatives: str = "random"  # "hard": the other image drawn by ITC similarity (ALBEF)

    def __post_init__(self) -> None:
        if self.itm_negatives not in ("random", "hard"):
            raise ValueError(f"itm_negatives: {self.itm_negatives!r} is not random or hard")

    mvm_sample_prob: float = 0.015  # share of images that get one VD word masked (official code)
    mvm_temperature: float = 0.07  # the official code has none (loss floor ~5.6)
    mlm_weight: float = 1.0
    mvm_weight: float = 1.0
    itm_weight: float = 1.0
    itc_weight: float = 0.0  # not in SOHO: 0 is the paper's objective
    itc_temperature: float = 0.05


def loss_mean(per_item: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The batch's mean loss with the items not `valid` (bool, same shape; None: all valid)
    counted as 0: each decoded sample keeps the weight it has in a whole batch, so a rank or
    micro-batch with few of them does not scale their gradients up. A batch with none gives a
    zero that still reaches every parameter (ZeRO needs every gradient)."""
    if valid is None:
        return per_item.mean()
    return torch.where(valid, per_item, 0.0).sum() / max(per_item.numel(), 1)


def valid_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of a metric over the `valid` items (None: all); 0 when there are none."""
    if valid is None:
        return values.mean()
    return torch.where(valid, values, 0.0).sum() / valid.sum().clamp(min=1)


def decoded_pairs(
    image_valid: torch.Tensor | None, text_image_index: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(texts (T,) whose own image decoded, (T, B) pairs of such a text and a decoded image);
    (None, None) when the batch says nothing of decoding (every image counts)."""
    if image_valid is None:
        return None, None
    text_valid = image_valid[text_image_index]
    return text_valid, text_valid[:, None] & image_valid[None, :]


def text_positives(
    text_ids: torch.Tensor, text_image_index: torch.Tensor, num_images: int
) -> torch.Tensor:
    """(T, B) bool: image b is a right match for text t (its own image, or an image that has a
    caption identical to t: such a pair is not a negative, whatever the batch says)."""
    same = (text_ids[:, None, :] == text_ids[None, :, :]).all(-1)  # (T, T)
    owner = F.one_hot(text_image_index, num_images).bool()  # (T, B)
    return (same.float() @ owner.float()) > 0


def pair_for_itm(
    text_image_index: torch.Tensor,
    num_images: int,
    negative_prob: float,
    similarity: torch.Tensor | None = None,
    positives: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the image each caption is read with: (image rows (T,), itm labels (T,), 1 = match).

    A negative is another image of the batch, so the CNN never reruns: chosen uniformly, or,
    given `similarity` (T, B) logits of the captions against the images, drawn with probability
    softmax(similarity) over the images that are not `positives` (T, B; default: the caption's
    own) (ALBEF's hard negatives: an image that already looks like the caption's, which a colour
    alone does not tell apart). A caption every image matches stays a positive.
    """
    count = text_image_index.shape[0]
    device = text_image_index.device
    if num_images < 2:
        return text_image_index, torch.ones(count, dtype=torch.long, device=device)
    negative = torch.rand(count, device=device) < negative_prob
    if similarity is None:
        shift = torch.randint(1, num_images, (count,), device=device)  # never 0: another image
        other = (text_image_index + shift) % num_images
    else:
        if positives is None:
            positives = F.one_hot(text_image_index, num_images).bool()
        # Gumbel-max: a softmax draw without a host sync, and a NaN similarity cannot abort it.
        gumbel = -torch.empty_like(similarity, dtype=torch.float).exponential_().log()
        logits = similarity.detach().float().masked_fill(positives, float("-inf"))
        other = (logits + gumbel).argmax(dim=1)
        negative &= ~positives.all(dim=1)
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


def unimodal_features(
    soho: Soho,
    text_ids: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    visual_embeds: torch.Tensor | None = None,
    visual_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L2-normalised mean of the fusion encoder's output over one modality alone: (T, D) for
    texts or (B, D) for images: O(texts + images) forwards instead of O(texts x images).
    """
    if visual_embeds is None:
        hidden, _ = soho.fuse(text_ids, text_mask)
        mask = text_mask
    else:
        empty = torch.zeros(
            visual_embeds.shape[0], 0, dtype=torch.long, device=visual_embeds.device
        )
        hidden, _ = soho.fuse(empty, empty, visual_embeds, visual_mask)
        mask = visual_mask
    mean = masked_mean(hidden, mask)
    return F.normalize(mean.float(), dim=-1)


def contrastive_loss(
    soho: Soho,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    visual_embeds: torch.Tensor,
    visual_mask: torch.Tensor,
    text_image_index: torch.Tensor,
    temperature: float,
    image_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric in-batch InfoNCE between unimodal caption (T) and image (B) features; an image
    with several captions spreads its target evenly over them. Images `image_valid` (B,) False
    and their captions are neither scored nor candidates. Returns (loss, the (T, B) logits)."""
    text = unimodal_features(soho, text_ids, text_mask)  # (T, D)
    image = unimodal_features(soho, visual_embeds=visual_embeds, visual_mask=visual_mask)  # (B, D)
    logits = text @ image.t() / temperature  # (T, B)
    text_valid, pair_valid = decoded_pairs(image_valid, text_image_index)
    if pair_valid is not None:
        # Finite, not -inf: a row with no candidate left stays a number (its weight is 0).
        logits = logits.masked_fill(~pair_valid, -1e4)
    text_to_image = loss_mean(
        F.cross_entropy(logits, text_image_index, reduction="none"), text_valid
    )
    targets = F.one_hot(text_image_index, image.shape[0]).t().float()  # (B, T)
    targets = targets / targets.sum(1, keepdim=True).clamp(min=1)
    image_to_text = loss_mean(-(targets * logits.t().log_softmax(-1)).sum(1), image_valid)
    return (text_to_image + image_to_text) / 2, logits


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
    """Batch keys: images, image_sizes, text_ids (masked), text_mask, text_image_index, mlm_labels;
    sample_valid if the loader gives it."""
    soho = model.soho
    image_valid = batch.get("sample_valid")
    visual = soho.encode_image(  # CNN once per image
        batch["images"], batch["image_sizes"], image_valid=image_valid
    )
    num_images = batch["images"].shape[0]
    text_valid, _ = decoded_pairs(image_valid, batch["text_image_index"])

    def itc() -> tuple[torch.Tensor, torch.Tensor]:
        # Unmasked images and the (MLM-masked) captions, each read alone.
        return contrastive_loss(
            soho,
            batch["text_ids"],
            batch["text_mask"],
            soho.embed_visual(visual),
            visual.mask,
            batch["text_image_index"],
            settings.itc_temperature,
            image_valid,
        )

    # Hard negatives need ITC's similarities first; otherwise ITC runs after ITM, which keeps the
    # order of the default path's random draws, and with it the losses a checkpoint resumes into.
    itc_loss, similarity, positives = None, None, None
    if settings.itm_negatives == "hard":
        itc_loss, similarity = itc()
        unmasked = torch.where(batch["mlm_labels"] != -100, batch["mlm_labels"], batch["text_ids"])
        positives = text_positives(unmasked, batch["text_image_index"], num_images)
        if image_valid is not None:  # a blank stand-in is never drawn as a hard negative
            positives = positives | ~image_valid[None, :]
    rows, itm_labels = pair_for_itm(
        batch["text_image_index"], num_images, settings.itm_negative_prob, similarity, positives
    )

    has_vd = soho.dictionary is not None  # without a dictionary there is no MVM
    mvm_mask = choose_mvm_mask(visual.indices, settings.mvm_sample_prob) if has_vd else None
    visual_embeds = soho.embed_visual(visual, mvm_mask)  # (B, N, D)
    hidden, pooled = soho.fuse(
        batch["text_ids"], batch["text_mask"], visual_embeds[rows], visual.mask[rows]
    )  # (T, L+N, D), (T, D)
    text_len = batch["text_ids"].shape[1]
    matched = itm_labels.bool()
    pair_valid = None  # both the caption's own image and the image it is read with decoded
    if text_valid is not None:
        pair_valid = text_valid & image_valid[rows]
        matched = matched & pair_valid

    # MLM: only masked text positions of matched pairs reach the vocabulary projection.
    mlm_labels = batch["mlm_labels"].masked_fill(~matched[:, None], -100)
    mlm_positions = mlm_labels != -100  # (T, L)
    mlm_logits = model.mlm_head(hidden[:, :text_len][mlm_positions])  # (M, V)
    mlm_targets = mlm_labels[mlm_positions]
    mlm_count = int(mlm_targets.numel())
    mlm_loss = _mean_or_zero(
        F.cross_entropy(mlm_logits.float(), mlm_targets, reduction="sum"), mlm_count
    )

    itm_logits = model.itm_head(pooled).float()  # (T, 2)
    itm_loss = loss_mean(F.cross_entropy(itm_logits, itm_labels, reduction="none"), pair_valid)
    loss = settings.mlm_weight * mlm_loss + settings.itm_weight * itm_loss
    extra = {}
    if has_vd:
        # MVM: masked cells of matched pairs predict their own VD word.
        mvm_positions = mvm_mask[rows] & matched[:, None]  # (T, N)
        mvm_targets = visual.indices[rows][mvm_positions]
        mvm_logits = model.mvm_head(
            hidden[:, text_len:][mvm_positions], soho.dictionary.embed, settings.mvm_temperature
        )
        mvm_count = int(mvm_targets.numel())
        mvm_loss = _mean_or_zero(
            F.cross_entropy(mvm_logits, mvm_targets, reduction="sum"), mvm_count
        )
        loss = loss + settings.mvm_weight * mvm_loss
        with torch.no_grad():
            perplexity, used = vd_usage(visual.indices, soho.dictionary.size)
            extra.update(
                mvm_loss=mvm_loss.detach(),
                mvm_acc=_accuracy(mvm_logits, mvm_targets),
                mvm_count=torch.tensor(float(mvm_count)),
                vd_perplexity=perplexity,
                vd_used=used,
            )
    if itc_loss is None and settings.itc_weight > 0:
        itc_loss, _ = itc()
    if itc_loss is not None:
        loss = loss + settings.itc_weight * itc_loss
        extra["itc_loss"] = itc_loss.detach()
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "mlm_loss": mlm_loss.detach(),
            "itm_loss": itm_loss.detach(),
            "mlm_acc": _accuracy(mlm_logits, mlm_targets),
            "itm_acc": valid_mean((itm_logits.argmax(-1) == itm_labels).float(), pair_valid),
            "mlm_count": torch.tensor(float(mlm_count)),
            **extra,
        }
    return loss, metrics


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.numel() == 0:
        return torch.tensor(math.nan)
    return (logits.argmax(-1) == targets).float().mean()
