"""Does a pre-trained model's MLM read shape (and colour) from the image?

For fresh scenes of the synthetic world, the caption "a <colour> <shape> in the <row> <col>." is
read with the shape word masked (the colour, row and column say which cell), and the MLM head's
choice among the three shape words is scored: once with the caption's own image and once with
another scene's image (what the text alone gets). The same with the colour word masked (choice
among the five colours). Own-image accuracy far above the other-image accuracy means the
transformer finds the cell and reads that attribute from its visual token.

    .venv/bin/python benchmarks/shape_mlm_probe.py --checkpoint runs/demo/pretrain/export/model.pt

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_pipeline.collate import pad_images  # noqa: E402
from data_pipeline.synthetic_scenes import (  # noqa: E402
    COLORS,
    SHAPES,
    draw_scene,
    encode,
    random_scene,
)
from data_pipeline.transforms import ImageTransform, TextTransform  # noqa: E402
from soho_scale.model.config import build_config  # noqa: E402
from soho_scale.model.soho import SohoPretrain  # noqa: E402
from soho_scale.pretrained import BUNDLED_BERT, resolve_pretrained  # noqa: E402


def load(checkpoint: str) -> SohoPretrain:
    blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = {k: v for k, v in blob["config"].items() if k != "init_from"}
    model = SohoPretrain(build_config("tiny", **config))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo/pretrain/export/model.pt")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load(args.checkpoint)
    text = TextTransform(resolve_pretrained(BUNDLED_BERT), 16)
    mask_id = text.special_ids()["mask"]
    transform = ImageTransform(min_size=64, max_size=96)
    rng = random.Random(args.seed)
    images, rows = [], []
    for i in range(args.images):
        scene = random_scene(rng)
        images.append(transform(encode(draw_scene(scene, rng), "JPEG")))
        s = rng.choice(scene.shapes)
        rows.append((i, s))
    pixels, sizes = pad_images(images)
    visual = model.soho.encode_image(pixels, sizes)
    embeds = model.soho.embed_visual(visual)
    other = torch.roll(torch.arange(args.images), 1)  # another scene's image
    result = {"checkpoint": args.checkpoint, "images": args.images}
    for target, words in (("shape", SHAPES), ("color", tuple(COLORS))):
        captions = [f"a {s.color} {s.shape} in the {s.row} {s.col}." for _, s in rows]
        ids, mask = text(captions)
        word_ids = [text(list(words))[0][:, 1].tolist()]  # each word is one WordPiece
        answer = torch.tensor([words.index(getattr(s, target)) for _, s in rows])
        position = 3 if target == "shape" else 2  # [CLS] a <colour> <shape>
        masked = ids.clone()
        masked[:, position] = mask_id
        for name, image_rows in (("own_image", torch.arange(args.images)), ("other_image", other)):
            hidden, _ = model.soho.fuse(masked, mask, embeds[image_rows], visual.mask[image_rows])
            logits = model.mlm_head(hidden[:, position])[:, word_ids[0]]
            accuracy = (logits.argmax(1) == answer).float().mean().item()
            result[f"{target}_{name}"] = round(100.0 * accuracy, 1)
    result["chance"] = {"shape": round(100 / len(SHAPES), 1), "color": round(100 / len(COLORS), 1)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
