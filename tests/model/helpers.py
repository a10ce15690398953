"""A small generated pre-training batch in the documented batch format (for model tests)."""

import torch


def make_batch(num_images: int = 4, captions_per_image: int = 2, length: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([[64, 96], [96, 64], [64, 64], [32, 96]])[:num_images]
    images = torch.zeros(num_images, 3, 96, 96, dtype=torch.uint8)
    for i, (h, w) in enumerate(sizes.tolist()):
        images[i, :, :h, :w] = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    count = num_images * captions_per_image
    text_ids = torch.randint(1000, 3000, (count, length), generator=g)
    text_ids[:, 0], text_ids[:, -1] = 101, 102
    mlm_labels = torch.full_like(text_ids, -100)
    masked = torch.zeros_like(text_ids, dtype=torch.bool)
    masked[:, 2] = masked[:, 5] = True
    mlm_labels[masked] = text_ids[masked]
    text_ids = text_ids.masked_fill(masked, 103)
    return {
        "images": images,
        "image_sizes": sizes,
        "text_ids": text_ids,
        "text_mask": torch.ones_like(text_ids),
        "text_image_index": torch.arange(count) // captions_per_image,
        "mlm_labels": mlm_labels,
    }
