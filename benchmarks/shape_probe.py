"""Where along the visual path is a shape's kind readable? Linear probes on the synthetic world.

Draws fresh scenes of the synthetic world (`data_pipeline.synthetic_scenes`, the demo's image
sizes, JPEG as the COCO-style images), resizes them as a job's `data.image` does, runs the model's
vision path and reads, for every drawn shape, the feature at the grid cell under the shape's
centre at each point: the ResNet stages C2-C5 (strides 4-32), the neck (the transformer width),
the visual-dictionary word, and what the transformer reads (`vd_fusion`). A multinomial logistic
regression per point (train on 70% of the images, accuracy on the rest) predicts the shape
(circle/square/triangle, chance 33%) and the colour (5, chance 20%). Also reported: shape accuracy
per image size (a 64-px side gives the 2x2 grid the scene's cells lie on; 77-80 px a third
column that cuts the right cell), and how the dictionary's words split by shape and colour.

`--train-steps K` first trains the vision encoder plus a linear head on the per-shape labels
(shape and colour, supervised, from the given weights) for K steps: how learnable shape is for
this trunk at this image size, whatever pre-training makes of it.

    .venv/bin/python benchmarks/shape_probe.py --checkpoint runs/demo/pretrain/export/model.pt
    .venv/bin/python benchmarks/shape_probe.py --checkpoint random --train-steps 300
    .venv/bin/python benchmarks/shape_probe.py --checkpoint random --min-size 128 --max-size 192

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipeline.synthetic_scenes import (  # noqa: E402
    COLORS,
    SHAPES,
    Scene,
    draw_scene,
    encode,
    random_scene,
)
from data_pipeline.transforms import ImageTransform  # noqa: E402
from soho_scale.model import vision as vision_module  # noqa: E402
from soho_scale.model.config import build_config  # noqa: E402
from soho_scale.model.soho import Soho  # noqa: E402

COLOR_NAMES = tuple(COLORS)
STAGE_STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}


def shape_centres(scene: Scene, rng: random.Random) -> list[tuple[float, float]]:
    """The (x, y) centre of each shape `draw_scene(scene, rng)` draws (its random draws, replayed)."""
    rng.randint(235, 255)
    cell_w, cell_h = scene.width / 2, scene.height / 2
    centres = []
    for s in scene.shapes:
        size = min(cell_w, cell_h) * rng.uniform(0.62, 0.8)
        slack_x, slack_y = (cell_w - size) / 2, (cell_h - size) / 2
        cx = cell_w * (0.5 + (s.col == "right")) + rng.uniform(-slack_x, slack_x) * 0.6
        cy = cell_h * (0.5 + (s.row == "bottom")) + rng.uniform(-slack_y, slack_y) * 0.6
        centres.append((cx, cy))
    return centres


def probe_set(n_images: int, seed: int, transform: ImageTransform) -> list[dict]:
    """Images (uint8 tensors) with one record per shape: labels and centre in output pixels."""
    rng = random.Random(seed)
    items = []
    for _ in range(n_images):
        scene = random_scene(rng)
        replay = random.Random()
        replay.setstate(rng.getstate())
        centres = shape_centres(scene, replay)
        image = draw_scene(scene, rng)
        for (cx, cy), s in zip(centres, scene.shapes):  # the centre lies inside every shape
            assert image.getpixel((int(cx), int(cy))) == COLORS[s.color], "centre replay drifted"
        tensor = transform(encode(image, "JPEG"))
        scale_y, scale_x = tensor.shape[1] / scene.height, tensor.shape[2] / scene.width
        shapes = [
            (SHAPES.index(s.shape), COLOR_NAMES.index(s.color), cy * scale_y, cx * scale_x)
            for (cx, cy), s in zip(centres, scene.shapes)
        ]
        items.append({"image": tensor, "shapes": shapes, "size": f"{scene.width}x{scene.height}"})
    return items


def load_model(checkpoint: str, overrides: dict) -> Soho:
    if checkpoint == "random":
        model = Soho(build_config("tiny", vd_fusion="gate", **overrides))
        return model
    blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = {**blob["config"], **overrides}
    preset = {k: v for k, v in config.items() if k != "init_from"}
    model = Soho(build_config("tiny", **preset))
    state = {k[len("soho.") :]: v for k, v in blob["state_dict"].items() if k.startswith("soho.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("gate.")]:  # gate: older exports
        raise ValueError(f"{checkpoint}: missing {missing}, unexpected {unexpected}")
    return model


def stem_without_maxpool(model: Soho) -> None:
    """Output stride 16 instead of 32 (the stem's max-pool removed): a 4x4 grid at 64 px."""
    model.vision.stem[3] = torch.nn.Identity()
    for name in ("c2", "c3", "c4", "c5"):
        STAGE_STRIDES[name] //= 2


def c5_at_stride_16(model: Soho) -> None:
    """Output stride 16 instead of 32: the last stage keeps C4's resolution (its first block's
    stride 1), a 4x4 grid at 64 px. The grid mask follows (`vision.C5_STRIDE`)."""
    block = model.vision.stages[3][0]
    block.conv1.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)
    vision_module.C5_STRIDE = 16
    STAGE_STRIDES["c5"] = 16


def vision_points(model: Soho, images: torch.Tensor, upto_neck: bool = False) -> dict:
    """Feature maps (B, C, h, w) at each probe point for a batch of same-size images."""
    vision = model.vision
    maps = {}
    sizes = torch.tensor([list(images.shape[2:])]).expand(len(images), 2)
    x = vision.stem(vision.pixels(images, sizes))  # uint8 -> normalised, as the encoder does
    for name, stage in zip(("c2", "c3", "c4", "c5"), vision.stages):
        x = stage(x)
        maps[name] = x
    if vision.pool > 1:
        x = F.max_pool2d(x, kernel_size=vision.pool, stride=vision.pool, ceil_mode=True)
    neck = vision.neck(x)
    maps["neck"] = neck
    if upto_neck or model.dictionary is None:  # vd_fusion none: the transformer reads the neck
        return maps
    b, d, h, w = neck.shape
    flat = neck.flatten(2).transpose(1, 2).reshape(-1, d)
    indices = model.dictionary.assign(flat)
    words = model.dictionary.embed[indices]
    maps["vd_word"] = words.view(b, h, w, d).permute(0, 3, 1, 2)
    maps["vd_index"] = indices.view(b, 1, h, w).float()
    if model.gate is not None:
        tokens = model.gate(flat, words).view(b, h, w, d).permute(0, 3, 1, 2)
        maps["gate_tokens"] = tokens
    return maps


def stride_of(name: str) -> int:
    return STAGE_STRIDES.get(name, STAGE_STRIDES["c5"])


def batches_by_size(items: list[dict], batch: int):
    groups = defaultdict(list)
    for i, item in enumerate(items):
        groups[tuple(item["image"].shape)].append(i)
    for rows in groups.values():
        for start in range(0, len(rows), batch):
            yield rows[start : start + batch]


def gather(maps: dict[str, torch.Tensor], shapes: list[tuple], row: int) -> dict:
    out = defaultdict(list)
    for name, fmap in maps.items():
        s = stride_of(name)
        h, w = fmap.shape[2:]
        for _, _, cy, cx in shapes:
            out[name].append(fmap[row, :, min(int(cy // s), h - 1), min(int(cx // s), w - 1)])
    return out


@torch.no_grad()
def extract(model: Soho, items: list[dict], bn_batch_stats: bool) -> dict:
    model.eval()
    if bn_batch_stats:  # random weights: BN's running statistics are not the features' own
        model.vision.train()
    feats = defaultdict(list)
    labels = {"shape": [], "color": [], "image": [], "size": []}
    for rows in batches_by_size(items, 64):
        images = torch.stack([items[r]["image"] for r in rows])
        maps = vision_points(model, images)
        for j, r in enumerate(rows):
            for name, vectors in gather(maps, items[r]["shapes"], j).items():
                feats[name].extend(vectors)
            for shape, color, _, _ in items[r]["shapes"]:
                labels["shape"].append(shape)
                labels["color"].append(color)
                labels["image"].append(r)
                labels["size"].append(items[r]["size"])
    return {
        "features": {k: torch.stack(v).float() for k, v in feats.items()},
        "shape": torch.tensor(labels["shape"]),
        "color": torch.tensor(labels["color"]),
        "image": torch.tensor(labels["image"]),
        "size": labels["size"],
    }


def linear_probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, classes: int):
    """Multinomial logistic regression (L-BFGS, small L2) -> predictions on every row."""
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x[train] @ weight + bias, y[train]) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (x @ weight + bias).argmax(1)


def lookup_accuracy(index: torch.Tensor, y: torch.Tensor, train: torch.Tensor) -> float:
    """Accuracy of predicting y from the VD index alone by the majority label per index (train)."""
    votes = defaultdict(Counter)
    for i, label in zip(index[train].long().tolist(), y[train].tolist()):
        votes[i][label] += 1
    fallback = Counter(y[train].tolist()).most_common(1)[0][0]
    test = ~train
    predicted = [
        votes[i].most_common(1)[0][0] if i in votes else fallback
        for i in index[test].long().tolist()
    ]
    return round(100.0 * (torch.tensor(predicted) == y[test]).float().mean().item(), 1)


def report(data: dict, seed: int) -> dict:
    images = data["image"]
    n_images = int(images.max()) + 1
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))
    train_images = order[: int(0.7 * n_images)]
    train = torch.isin(images, train_images)
    test = ~train
    out: dict = {"shapes_train": int(train.sum()), "shapes_test": int(test.sum()), "points": {}}
    for name, x in data["features"].items():
        if name == "vd_index":
            continue
        row = {"dim": x.shape[1]}
        for target, classes in (("shape", len(SHAPES)), ("color", len(COLOR_NAMES))):
            y = data[target]
            predicted = linear_probe(x, y, train, classes)
            correct = predicted == y
            row[target] = round(100.0 * correct[test].float().mean().item(), 1)
            if target == "shape":
                row["shape_train"] = round(100.0 * correct[train].float().mean().item(), 1)
                by_size = defaultdict(list)
                for ok, size, t in zip(correct.tolist(), data["size"], test.tolist()):
                    if t:
                        by_size[size].append(ok)
                row["shape_by_size"] = {
                    k: round(100.0 * sum(v) / len(v), 1) for k, v in sorted(by_size.items())
                }
        out["points"][name] = row
    if "vd_index" not in data["features"]:
        return out
    index = data["features"]["vd_index"][:, 0]
    out["vd_index_lookup"] = {
        "shape": lookup_accuracy(index, data["shape"], train),
        "color": lookup_accuracy(index, data["color"], train),
        "distinct_words_used": len(set(index.long().tolist())),
    }
    return out


def supervised(model: Soho, items: list[dict], steps: int, seed: int, lr: float) -> list[float]:
    """Train the vision encoder + linear heads on per-shape shape/colour labels (the neck output
    at each shape's cell), SGD as the demo's CNN group; -> loss every 50 steps."""
    torch.manual_seed(seed)
    dim = model.config.hidden_size
    heads = torch.nn.Linear(dim, len(SHAPES) + len(COLOR_NAMES))
    params = list(model.vision.parameters()) + list(heads.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    model.vision.train()
    batches = [rows for rows in batches_by_size(items, 16)]
    losses = []
    for step in range(steps):
        rows = batches[step % len(batches)]
        images = torch.stack([items[r]["image"] for r in rows])
        neck = vision_points(model, images, upto_neck=True)["neck"]
        vectors, shape_y, color_y = [], [], []
        for j, r in enumerate(rows):
            gathered = gather({"neck": neck}, items[r]["shapes"], j)["neck"]
            vectors.extend(gathered)
            shape_y += [s[0] for s in items[r]["shapes"]]
            color_y += [s[1] for s in items[r]["shapes"]]
        logits = heads(torch.stack(vectors))
        loss = F.cross_entropy(logits[:, : len(SHAPES)], torch.tensor(shape_y)) + F.cross_entropy(
            logits[:, len(SHAPES) :], torch.tensor(color_y)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 3))
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo/pretrain/export/model.pt")
    parser.add_argument("--images", type=int, default=600, help="probe images (fresh scenes)")
    parser.add_argument("--min-size", type=int, default=64)
    parser.add_argument("--max-size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--vd-size", type=int, default=None)
    parser.add_argument("--no-stem-maxpool", action="store_true", help="output stride 16")
    parser.add_argument("--c5-stride-16", action="store_true", help="last stage at stride 16")
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    started = time.time()
    overrides = {"vd_size": args.vd_size} if args.vd_size else {}
    model = load_model(args.checkpoint, overrides)
    if args.no_stem_maxpool:
        stem_without_maxpool(model)
    if args.c5_stride_16:
        c5_at_stride_16(model)
    transform = ImageTransform(min_size=args.min_size, max_size=args.max_size)
    items = probe_set(args.images, args.seed, transform)
    result: dict = {"checkpoint": args.checkpoint, "args": vars(args)}
    if args.train_steps:
        train_items = probe_set(args.train_images, args.seed + 1, transform)
        result["train_losses"] = supervised(
            model, train_items, args.train_steps, args.seed, args.lr
        )
    random_bn = args.checkpoint == "random" and not args.train_steps
    result.update(report(extract(model, items, random_bn), args.seed))
    result["grid"] = {
        size: list(vision_points(model.eval(), item["image"][None])["neck"].shape[2:])
        for size, item in {i["size"]: i for i in items}.items()
    }
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
