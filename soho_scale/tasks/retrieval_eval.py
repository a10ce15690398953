"""Retrieval evaluation: rank every text against every image by ITM score, the paper's protocol.

`evaluate_retrieval(model, data, mode="exact")` runs the CNN once per image and caches the
transformer inputs of its visual tokens, then scores every (image, text) pair with the ITM head in
chunks, and computes Recall@K on the full image x text matrix (`recall_at_k`). Work is split over
ranks by image batches; only the score rows travel, to rank 0. `mode="two_stage"` first ranks by
cosine similarity of unimodal features (one text-only / image-only transformer pass each), then
re-ranks the top `k` images per text and top `k` texts per image with ITM; it also reports the
first stage's own ranking (`first_stage_*`). `soho-scale eval` runs the modes the job's
`eval.retrieval_modes` names.

Determinism: images are batched by exact size (no padding, so a score equals that of the pair
scored alone) in a plan that does not depend on the number of ranks, so 1 and N ranks produce
the same numbers. MSCOCO 1K is `folds=5` on the 5K test split (mean over five 1K-image folds).
Under ZeRO-3 ranks would need equal forward counts: evaluate a consolidated (exported) model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.normalise import open_image, shown_size
from data_pipeline.transforms import ImageDecodeError, blank_image
from soho_scale.objectives import unimodal_features
from soho_scale.tasks.retrieval import recall_at_k

logger = logging.getLogger(__name__)
KS = (1, 5, 10)


@dataclass
class RetrievalSet:
    """A retrieval test split: images and the captions that belong to them."""

    images: Sequence[torch.Tensor]  # image i: (3, h_i, w_i) uint8 (may decode lazily)
    image_sizes: torch.Tensor  # (I, 2) long (h, w) of each image as `images[i]` returns it
    text_ids: torch.Tensor  # (T, L) long
    text_mask: torch.Tensor  # (T, L) long
    text_to_image: torch.Tensor  # (T,) long, the image of each text

    @classmethod
    def from_tensors(cls, images: Sequence[torch.Tensor], text_ids, text_mask, text_to_image):  # noqa: ANN001, ANN206
        sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images], dtype=torch.long)
        return cls(list(images), sizes, text_ids, text_mask, torch.as_tensor(text_to_image))


class EncodedImages(Sequence):
    """Image file bytes decoded on access by `transform` (5K test images at 600x1000 would be
    ~30 GB as float tensors). `sizes()` reads only the file headers.

    An image that does not decode (corrupt or truncated bytes, a decompression bomb) is a blank
    image of the size its header gave (the stand-in's size without one), as the loader's
    stand-ins: it is scored, and its index kept in `undecoded` (this process's)."""

    def __init__(self, blobs: list[bytes], transform: Any):
        self.blobs = blobs
        self.transform = transform
        self.undecoded: set[int] = set()

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        try:
            return self.transform(self.blobs[index])
        except ImageDecodeError:
            self.undecoded.add(index)
            return blank_image(*self.size_of(index))

    def size_of(self, index: int) -> tuple[int, int]:
        """(height, width) once decoded, from the file header alone."""
        try:
            return self.transform.output_size(*shown_size(open_image(self.blobs[index])))
        except Exception:  # noqa: BLE001 - PIL raises many types on hostile data
            return self.transform.stand_in_size()

    def sizes(self) -> torch.Tensor:
        return torch.tensor([self.size_of(i) for i in range(len(self))], dtype=torch.long)


def retrieval_set_from_samples(
    samples: Iterable[dict[str, Any]],
    image_transform: Any,
    text_transform: Any,
    max_captions: int = 5,
) -> RetrievalSet:
    """Raw Karpathy-split samples (`image` bytes, `captions` list) -> a RetrievalSet. The usual
    protocol keeps the first 5 captions of each image (5K images -> 25K texts)."""
    blobs, texts, owners = [], [], []
    for sample in samples:
        captions = list(sample["captions"])[:max_captions]
        if not captions:
            continue  # an image without a caption cannot be scored in either direction
        owners += [len(blobs)] * len(captions)
        blobs.append(bytes(sample["image"]))
        texts += captions
    if not blobs:
        raise ValueError("retrieval: the evaluation split holds no image with a caption")
    images = EncodedImages(blobs, image_transform)
    text_ids, text_mask = text_transform(texts)
    return RetrievalSet(images, images.sizes(), text_ids, text_mask, torch.tensor(owners))


def load_retrieval_set(
    remote: str,
    cache_root: str,
    image_transform: Any,
    text_transform: Any,
    max_captions: int = 5,
    **dataset_options: Any,
) -> RetrievalSet:
    """The Karpathy test split from shards (`soho-scale data convert karpathy`; local or s3://).

    Every rank reads the whole split (bytes and captions only; images decode when scored).
    """
    from data_pipeline.streaming import build_dataset

    dataset = build_dataset(
        [remote], None, cache_root, batch_size=1, shuffle=False, **dataset_options
    )
    samples = (dataset.get_item(i) for i in range(dataset.num_samples))
    return retrieval_set_from_samples(samples, image_transform, text_transform, max_captions)


def plan_image_batches(image_sizes: torch.Tensor, batch_size: int) -> list[list[int]]:
    """Batches of same-size images, in an order that depends only on the sizes."""
    order = sorted(range(len(image_sizes)), key=lambda i: (tuple(image_sizes[i].tolist()), i))
    batches: list[list[int]] = []
    for index in order:
        if (
            batches
            and len(batches[-1]) < batch_size
            and torch.equal(image_sizes[batches[-1][0]], image_sizes[index])
        ):
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


@torch.no_grad()
def _encode(model: nn.Module, data: RetrievalSet, batch: list[int], device):  # noqa: ANN001, ANN202
    images = torch.stack([data.images[i] for i in batch]).to(device)  # the model normalises
    visual = model.soho.encode_image(images, data.image_sizes[batch].to(device))
    return model.soho.embed_visual(visual), visual.mask  # (b, N, D), (b, N)


@torch.no_grad()
def _score_batch(
    model: nn.Module,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    pair_batch: int,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """ITM log-odds of images (b, ...) against texts: (b, T), NaN where `candidates` is False."""
    count, num_texts = embeds.shape[0], text_ids.shape[0]
    scores = torch.full((count, num_texts), float("nan"), device=embeds.device)
    if candidates is None:  # every pair, text chunks against the whole image batch
        chunk = max(1, pair_batch // count)
        for start in range(0, num_texts, chunk):
            texts = torch.arange(start, min(start + chunk, num_texts), device=embeds.device)
            rows = torch.arange(count, device=embeds.device).repeat_interleave(len(texts))
            columns = texts.repeat(count)
            scores[rows, columns] = _itm(model, embeds, mask, text_ids, text_mask, rows, columns)
        return scores
    pairs = candidates.nonzero()  # (P, 2) (row, text)
    for start in range(0, len(pairs), pair_batch):
        rows, columns = pairs[start : start + pair_batch].unbind(1)
        scores[rows, columns] = _itm(model, embeds, mask, text_ids, text_mask, rows, columns)
    return scores


def _itm(model, embeds, mask, text_ids, text_mask, rows, columns) -> torch.Tensor:  # noqa: ANN001
    _, pooled = model.soho.fuse(text_ids[columns], text_mask[columns], embeds[rows], mask[rows])
    return model.match_score(pooled) if hasattr(model, "match_score") else _log_odds(model, pooled)


def _log_odds(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    logits = model.itm_head(pooled).float()
    return logits[:, 1] - logits[:, 0]


def _folds(data: RetrievalSet, folds: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(image indices, text indices) of each fold: contiguous image blocks (as equal as the
    count allows: a split that lost an image at conversion has one short fold), their texts."""
    num_images = len(data.image_sizes)
    if not 1 <= folds <= num_images:
        raise ValueError(f"retrieval: {num_images} images do not split into {folds} folds")
    out = []
    for images in torch.arange(num_images).tensor_split(folds):
        first, end = int(images[0]), int(images[-1]) + 1
        texts = (data.text_to_image >= first) & (data.text_to_image < end)
        out.append((images, texts.nonzero().squeeze(1)))
    return out


def _top_k_masks(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(I, T) similarities -> (images per text: top k in each column, texts per image: in rows)."""
    per_text = torch.zeros_like(sim, dtype=torch.bool)
    per_text.scatter_(0, sim.topk(min(k, sim.shape[0]), dim=0).indices, True)
    per_image = torch.zeros_like(sim, dtype=torch.bool)
    per_image.scatter_(1, sim.topk(min(k, sim.shape[1]), dim=1).indices, True)
    return per_text, per_image


def _reranked(itm: torch.Tensor, sim: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """ITM scores for the chosen pairs, first-stage order strictly below them for the rest."""
    if chosen.all():
        return itm
    offset = sim.max() - itm[chosen].min() + 1.0
    return torch.where(chosen, itm, sim - offset)


def _gather_to_zero(rows: torch.Tensor, owned: list[list[int]], total: int, rank: int, world: int):  # noqa: ANN202
    """Rows (n_rank, C) of each rank's images -> (total, C) on rank 0 (None elsewhere)."""
    if world == 1:
        full = torch.empty(total, rows.shape[1], dtype=rows.dtype, device=rows.device)
        full[owned[0]] = rows
        return full
    longest = max(len(o) for o in owned)
    padded = torch.zeros(longest, rows.shape[1], dtype=rows.dtype, device=rows.device)
    padded[: len(rows)] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, gathered, dst=0)
    if rank != 0:
        return None
    full = torch.empty(total, rows.shape[1], dtype=rows.dtype, device=rows.device)
    for part, indices in zip(gathered, owned):
        full[indices] = part[: len(indices)]
    return full


def _all_gather(rows: torch.Tensor, owned: list[list[int]], total: int, world: int) -> torch.Tensor:
    if world == 1:
        full = torch.empty(total, rows.shape[1], dtype=rows.dtype, device=rows.device)
        full[owned[0]] = rows
        return full
    longest = max(len(o) for o in owned)
    padded = torch.zeros(longest, rows.shape[1], dtype=rows.dtype, device=rows.device)
    padded[: len(rows)] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    full = torch.empty(total, rows.shape[1], dtype=rows.dtype, device=rows.device)
    for part, indices in zip(gathered, owned):
        full[indices] = part[: len(indices)]
    return full


def evaluate_retrieval(
    model: nn.Module,
    data: RetrievalSet,
    mode: Literal["exact", "two_stage"] = "exact",
    k: int = 16,
    folds: int = 1,
    rank: int = 0,
    world: int = 1,
    image_batch: int = 32,
    pair_batch: int = 512,
    return_scores: bool = False,
) -> dict[str, Any]:
    """Recall@1/5/10 both ways (`tr_r*`: image -> texts, `ir_r*`: text -> image) and `rsum` on
    the whole set; with folds > 1 also `fold_*`, the mean over equal image folds (COCO 1K).

    `model`: anything with `.soho` (Soho) and `.itm_head` (RetrievalModel, SohoPretrain). With
    world > 1, torch.distributed must be initialised; every rank calls this with the same data
    and gets the same result. `return_scores` adds "scores" (I, T), the final ranking matrix.
    """
    if mode not in ("exact", "two_stage"):
        raise ValueError(f"retrieval: mode must be exact or two_stage, got {mode!r}")
    started = time.perf_counter()
    was_training = model.training
    model.eval()  # no dropout, BN running statistics, no dictionary updates
    try:
        result = _evaluate(model, data, mode, k, folds, rank, world, image_batch, pair_batch)
    finally:
        model.train(was_training)
    scores = result.pop("scores")
    if rank == 0:
        result["seconds"] = time.perf_counter() - started
    if world > 1:  # the metrics only: the score matrix stays on rank 0
        box = [result if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if rank == 0 and return_scores:
        result = {**result, "scores": scores}
    return result


@torch.no_grad()
def _evaluate(model, data, mode, k, folds, rank, world, image_batch, pair_batch) -> dict:  # noqa: ANN001
    param = next(model.parameters())
    device = param.device
    num_images, num_texts = len(data.image_sizes), len(data.text_to_image)
    text_ids, text_mask = data.text_ids.to(device), data.text_mask.to(device)
    batches = plan_image_batches(data.image_sizes, image_batch)
    mine = batches[rank::world]
    owned = [[i for b in batches[r::world] for i in b] for r in range(world)]
    groups = [(torch.arange(num_images), torch.arange(num_texts))]
    if folds > 1:
        groups += _folds(data, folds)

    encoded = [_encode(model, data, batch, device) for batch in mine]
    sim = candidates = None
    masks: list[tuple[torch.Tensor, torch.Tensor]] = []
    if mode == "two_stage":
        features = [
            unimodal_features(model.soho, visual_embeds=e, visual_mask=m) for e, m in encoded
        ]
        local = (
            torch.cat(features)
            if features
            else torch.zeros(0, model.soho.config.hidden_size, device=device)
        )
        image_features = _all_gather(local, owned, num_images, world)  # (I, D)
        text_features = torch.cat([
            unimodal_features(model.soho, text_ids[s : s + pair_batch], text_mask[s : s + pair_batch])
            for s in range(0, num_texts, pair_batch)
        ])  # fmt: skip
        sim = image_features @ text_features.t()  # (I, T)
        candidates = torch.zeros_like(sim, dtype=torch.bool)
        # Ranking reuses these masks: top-k picks among tied scores differently on CPU and CUDA,
        # and a pair chosen there but never scored would rank by a missing ITM score.
        masks = [_top_k_masks(sim[images][:, texts], k) for images, texts in groups]
        for (images, texts), (per_text, per_image) in zip(groups, masks):
            candidates[images[:, None], texts[None, :]] |= per_text | per_image

    rows = [
        _score_batch(model, embeds, mask, text_ids, text_mask, pair_batch,
                     None if candidates is None else candidates[batch])
        for (embeds, mask), batch in zip(encoded, mine)
    ]  # fmt: skip
    local = torch.cat(rows) if rows else torch.zeros(0, num_texts, device=device)
    itm = _gather_to_zero(local, owned, num_images, rank, world)
    result: dict[str, Any] = {"mode": mode, "num_images": num_images, "num_texts": num_texts}
    if folds > 1:  # the report names the folds' protocol by their size
        result["num_folds"] = folds
    if mode == "two_stage":
        result["k"] = k
        result["pairs_scored"] = int(candidates.sum())
        if rank == 0:  # the first stage alone, for comparison (no ITM at all)
            first = recall_at_k(sim.cpu(), data.text_to_image, KS)
            result.update({f"first_stage_{key}": value for key, value in first.items()})
    else:
        result["pairs_scored"] = num_images * num_texts
    result["scores"] = None
    if rank != 0:
        return result
    for g, (images, texts) in enumerate(groups):
        owner = data.text_to_image[texts] - images[0]
        scores = itm[images][:, texts].cpu()
        if mode == "two_stage":
            sub_sim = sim[images][:, texts].cpu()
            per_text, per_image = (mask.cpu() for mask in masks[g])
            text_side = recall_at_k(_reranked(scores, sub_sim, per_text), owner, KS)
            image_side = recall_at_k(_reranked(scores, sub_sim, per_image), owner, KS)
            recall = {**{f"tr_r{n}": image_side[f"tr_r{n}"] for n in KS},
                      **{f"ir_r{n}": text_side[f"ir_r{n}"] for n in KS}}  # fmt: skip
            if g == 0:
                result["scores"] = _reranked(scores, sub_sim, per_text)
        else:
            recall = recall_at_k(scores, owner, KS)
            if g == 0:
                result["scores"] = scores
        recall["rsum"] = sum(recall.values())
        prefix = "" if g == 0 else "fold_"
        for key, value in recall.items():
            result[prefix + key] = result.get(prefix + key, 0.0) + value / (1 if g == 0 else folds)
    return result


def evaluate_job(  # noqa: ANN201
    job: Any,
    model: nn.Module,
    loader: Any,
    rank: int,
    world: int,
    converted_images: int | None = None,
):
    """`soho-scale eval` for retrieval: every rank reads the whole test split (bytes and captions)
    from the eval loader's dataset, then each of `eval.retrieval_modes` runs distributed. MSCOCO 5K
    also reports the 1K protocol (mean over 5 folds). Returns (metrics, predictions=[]).

    `converted_images`: how many images the split had before the conversion skipped any (its
    report; rank 0's is used). The 5K test set with an image lost at conversion is still the 5K
    protocol, in folds of 1000 images but the short one; the count of lost images goes with the
    metrics.
    """
    dataset = loader.dataset
    samples = (dataset.raw_sample(i) for i in range(dataset.num_samples))
    processor = dataset.processor  # the job's transforms (soho_scale.tasks.sample_processor)
    data = retrieval_set_from_samples(samples, processor.image, processor.text)
    present = len(data.images)
    split_images = max(present, converted_images or 0)
    if world > 1:  # rank 0's count for all: ranks that chose other folds would score other pairs
        box = [split_images]
        dist.broadcast_object_list(box, src=0)
        split_images = box[0]
    folds = job.eval.retrieval_folds or (5 if split_images >= 5000 else 1)
    if present < split_images:
        logger.warning(
            "retrieval: %d of the split's %d images were skipped at conversion (its "
            "conversion_report.json); recall is over the %d left",
            split_images - present, split_images, present,
        )  # fmt: skip
    numbers: dict[str, float] = {}
    for mode in job.eval.retrieval_modes:
        metrics = evaluate_retrieval(
            model, data, mode=mode, k=job.eval.retrieval_k, folds=folds, rank=rank, world=world
        )
        prefix = "" if mode == "exact" else "two_stage_"
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                keep = key.startswith(("first_stage_", "num_"))
                numbers[key if keep else prefix + key] = float(value)
    numbers["num_images_skipped"] = float(split_images - present)
    undecoded = set(getattr(data.images, "undecoded", ()))
    if world > 1:  # each rank decodes its share of the images
        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, sorted(undecoded))
        undecoded = {index for share in shares for index in share}
    if undecoded and rank == 0:
        logger.warning(
            "retrieval: %d images did not decode; each was scored as a blank image", len(undecoded)
        )
    numbers["num_images_undecodable"] = float(len(undecoded))
    return numbers, []
