"""Image-text retrieval: Recall@K in both directions from a full image x text score matrix.

Ties count against the model: the rank of a positive is the number of negatives scoring at least
as high, so a constant score matrix gets recall ~0, never 100.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

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
