"""`make demo`: the main job on embedded defaults (CPU, no network, no downloads).

Today: builds the `tiny` SOHO model and pre-trains it for a few steps on one generated batch
(coloured-shape images of mixed sizes, captions tokenised with the bundled BERT WordPiece
vocabulary, MLM masking), printing the MLM, MVM and ITM losses as they fall.
"""

from __future__ import annotations

import random
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import BertTokenizerFast

from soho_scale.model.config import build_config
from soho_scale.model.soho import SohoPretrain
from soho_scale.objectives import PretrainSettings, pretrain_loss
from soho_scale.resources import BUNDLED_BERT, resolve_pretrained

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("square", "circle")
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def _scene(rng: random.Random, height: int, width: int) -> tuple[torch.Tensor, list[str]]:
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    image = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)  # (3, H, W)
    captions = [f"a {colour} {shape}", f"there is one {colour} {shape} in the middle"]
    return (pixels / 255 - MEAN) / STD, captions


def generated_batch(tokenizer: BertTokenizerFast, num_images: int = 8, seed: int = 0) -> dict:
    rng = random.Random(seed)
    sizes = [rng.choice([(64, 96), (96, 64), (64, 64)]) for _ in range(num_images)]
    images = torch.zeros(num_images, 3, 96, 96)
    captions, owners = [], []
    for i, (h, w) in enumerate(sizes):
        pixels, texts = _scene(rng, h, w)
        images[i, :, :h, :w] = pixels
        captions += texts
        owners += [i] * len(texts)
    encoded = tokenizer(
        captions, padding="max_length", truncation=True, max_length=16, return_tensors="pt"
    )
    text_ids, text_mask = encoded["input_ids"], encoded["attention_mask"]
    generator = torch.Generator().manual_seed(seed)
    special = (text_ids == tokenizer.cls_token_id) | (text_ids == tokenizer.sep_token_id)
    masked = (torch.rand(text_ids.shape, generator=generator) < 0.15) & text_mask.bool() & ~special
    mlm_labels = torch.where(masked, text_ids, torch.full_like(text_ids, -100))
    return {
        "images": images,
        "image_sizes": torch.tensor(sizes),
        "text_ids": text_ids.masked_fill(masked, tokenizer.mask_token_id),
        "text_mask": text_mask,
        "text_image_index": torch.tensor(owners),
        "mlm_labels": mlm_labels,
    }


def main(steps: int = 40) -> int:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    tokenizer = BertTokenizerFast.from_pretrained(resolve_pretrained(BUNDLED_BERT))
    batch = generated_batch(tokenizer)
    model = SohoPretrain(build_config("tiny")).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    settings = PretrainSettings(mvm_sample_prob=1.0)
    print(
        f"tiny SOHO: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{batch['images'].shape[0]} images, {batch['text_ids'].shape[0]} captions"
    )
    print(f"{'step':>5} {'mlm':>8} {'mvm':>8} {'itm':>8} {'vd used':>8}")
    history, start = [], time.time()
    for step in range(1, steps + 1):
        loss, metrics = pretrain_loss(model, batch, settings)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append([float(metrics[k]) for k in ("mlm_loss", "mvm_loss", "itm_loss")])
        if step == 1 or step % 5 == 0:
            mlm, mvm, itm = history[-1]
            print(f"{step:>5} {mlm:8.3f} {mvm:8.3f} {itm:8.3f} {float(metrics['vd_used']):8.3f}")
    window = max(1, steps // 8)
    first = [sum(h[i] for h in history[:window]) / window for i in range(3)]
    last = [sum(h[i] for h in history[-window:]) / window for i in range(3)]
    print(f"{steps} steps in {time.time() - start:.1f}s")
    for name, a, b in zip(("mlm", "mvm", "itm"), first, last):
        print(f"{name}: {a:.3f} -> {b:.3f} ({'falling' if b < a else 'NOT falling'})")
    return 0 if all(b < a for a, b in zip(first, last)) else 1


if __name__ == "__main__":
    sys.exit(main())
