"""Visual encoding for downstream tasks: batched for training, batch-independent for evaluation.

Collate zero-pads every image to the batch's largest height and width. The transformer masks the
padded cells exactly, but the CNN does not: past its first layer the padding holds non-zero
activations (BN shift, bias) that its 3x3 convolutions mix into the real border cells. A sample's
prediction would then depend on which other images share its batch, and so on the batch size and
the number of ranks. `encode_images` with `batch_independent=True` runs the CNN once per distinct
image size, each group cropped to its own size (no padding at all), and lays the visual tokens
out on the batch's grid afterwards: evaluation gives the same answer for a sample whatever batch,
rank or world size it lands in.
"""

from __future__ import annotations

import torch

from soho_scale.model.soho import Soho, VisualTokens


def encode_images(
    soho: Soho,
    images: torch.Tensor,
    image_sizes: torch.Tensor,
    batch_independent: bool = False,
    image_valid: torch.Tensor | None = None,
) -> VisualTokens:
    """images (B, 3, H, W) padded, image_sizes (B, 2) -> VisualTokens on a common (h, w) grid;
    image_valid (B,) False for blank stand-ins (they leave the dictionary be while training; the
    batch-independent path serves evaluation, where the dictionary does not update)."""
    if not batch_independent:
        return soho.encode_image(images, image_sizes, image_valid=image_valid)
    groups: dict[tuple[int, int], list[int]] = {}
    for row, (height, width) in enumerate(image_sizes.tolist()):
        groups.setdefault((height, width), []).append(row)
    parts = []
    for (height, width), rows in groups.items():
        index = torch.tensor(rows, device=images.device)
        visual = soho.encode_image(images[index, :, :height, :width], image_sizes[index])
        parts.append((index, visual))
    grid_h = max(v.grid_mask.shape[1] for _, v in parts)
    grid_w = max(v.grid_mask.shape[2] for _, v in parts)
    batch, dim = images.shape[0], parts[0][1].tokens.shape[-1]
    device, dtype = images.device, parts[0][1].tokens.dtype
    tokens = torch.zeros(batch, grid_h, grid_w, dim, device=device, dtype=dtype)
    grid_mask = torch.zeros(batch, grid_h, grid_w, device=device, dtype=torch.bool)
    indices = torch.full((batch, grid_h, grid_w), -1, device=device, dtype=torch.long)
    for index, visual in parts:
        h, w = visual.grid_mask.shape[1:]
        tokens[index, :h, :w] = visual.tokens.view(len(index), h, w, dim)
        grid_mask[index, :h, :w] = visual.grid_mask
        indices[index, :h, :w] = visual.indices.view(len(index), h, w)
    return VisualTokens(tokens.flatten(1, 2), grid_mask.flatten(1), grid_mask, indices.flatten(1))


def fuse_texts_with_images(
    soho: Soho,
    images: torch.Tensor,
    image_sizes: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    text_image_index: torch.Tensor,
    batch_independent: bool = False,
    image_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Text t read with image text_image_index[t] -> pooled [CLS] (T, D); the CNN runs once per
    image."""
    visual = encode_images(soho, images, image_sizes, batch_independent, image_valid)
    visual = visual.select(text_image_index)
    # An all-False MVM mask changes nothing but gives the (pre-training) mask embedding a zero
    # gradient: ZeRO expects a gradient for every parameter.
    embeds = soho.embed_visual(visual, torch.zeros_like(visual.mask))
    _, pooled = soho.fuse(text_ids, text_mask, embeds, visual.mask)
    return pooled
