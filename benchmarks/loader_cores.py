"""CPU per pre-training sample at the paper's image sizes, and the cores it takes to feed one GPU
at a target rate; prints one JSON line.

Samples: photo-like 640x480 JPEGs (COCO's usual size; smooth colour fields plus sensor-like noise,
quality 90) with 5 captions each, through the pre-training `SampleProcessor` (decode, SOHO resize
to 600/1000, i.e. 600x800, 4 captions tokenised and MLM-masked) and the pre-training collate in
batches of `--batch`, in one process and one thread:
- `uint8`: what the loader does: pixels stay uint8, the model normalises them on its device;
- `float_normalised`: the same plus ImageNet normalisation to float32 on the CPU, as the loader
  did before (four float passes over each image; four times the bytes to hand over);
- `decode_only`: JPEG decode alone (PIL, at the size it is stored).
The variants take turns for `--rounds` rounds; the median CPU time per sample is reported, and
`cores_per_gpu` = `--target` samples/s x CPU seconds per sample (the issue's 35% MFU is ~370
samples/s on one H200).

    .venv/bin/python benchmarks/loader_cores.py --samples 200 --rounds 5
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image

from data_pipeline.collate import collate_captions
from data_pipeline.samples import SampleProcessor
from data_pipeline.transforms import ImageTransform, TextTransform, decode_image
from soho_scale.model.vision import PIXEL_MEAN, PIXEL_STD
from soho_scale.pretrained import BUNDLED_BERT, resolve_pretrained

_MEAN = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
_STD = torch.tensor(PIXEL_STD).view(3, 1, 1)


def photo_like_jpegs(count: int, height: int, width: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        freq = rng.uniform(0.005, 0.03, 3)
        base = np.stack(
            [127 + 100 * np.sin(freq[c] * (x + (c + 1) * y) + phase[c]) for c in range(3)], -1
        )
        pixels = (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="samples per round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--source-size", default="480x640", help="HxW of the stored JPEGs")
    parser.add_argument("--min-size", type=int, default=600)
    parser.add_argument("--max-size", type=int, default=1000)
    parser.add_argument("--target", type=float, default=370.0, help="samples/s one GPU takes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    height, width = map(int, args.source_size.split("x"))
    jpegs = photo_like_jpegs(16, height, width)
    captions = [f"a photo of {n} things on a table near the window" for n in range(5)]
    processor = SampleProcessor(
        task="pretrain",
        image=ImageTransform(min_size=args.min_size, max_size=args.max_size),
        text=TextTransform(resolve_pretrained(BUNDLED_BERT), max_len=16),
    )

    def samples(normalise: bool) -> None:
        batch = []
        for i in range(args.samples):
            sample = processor({"image": jpegs[i % len(jpegs)], "captions": captions}, i, 0)
            if normalise:
                sample["image"] = sample["image"].float().div_(255.0).sub_(_MEAN).div_(_STD)
            batch.append(sample)
            if len(batch) == args.batch:
                collate_captions(batch)
                batch = []

    def decode_only() -> None:
        for i in range(args.samples):
            decode_image(jpegs[i % len(jpegs)])

    variants = {
        "uint8": lambda: samples(False),
        "float_normalised": lambda: samples(True),
        "decode_only": decode_only,
    }
    variants["uint8"]()  # warm-up: tokenizer load, allocator
    per_sample: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        names = list(variants)
        names = names[round_ % len(names) :] + names[: round_ % len(names)]  # rotate the order
        for name in names:
            start = time.process_time()
            variants[name]()
            per_sample[name].append((time.process_time() - start) / args.samples)
    ms = {name: 1000 * statistics.median(v) for name, v in per_sample.items()}
    output = processor({"image": jpegs[0], "captions": captions}, 0, 0)["image"]
    report = {
        "cpu_ms_per_sample": {k: round(v, 3) for k, v in ms.items()},
        "cores_per_gpu": {
            k: round(args.target * v / 1000, 2) for k, v in ms.items() if k != "decode_only"
        },
        "float_vs_uint8_cpu": round(ms["float_normalised"] / ms["uint8"], 3),
        "image_bytes_handed_over": {
            "uint8": output.numel(),
            "float_normalised": 4 * output.numel(),
        },
        "config": {**vars(args), "output_size": list(output.shape[1:]), "torch": torch.__version__},
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
