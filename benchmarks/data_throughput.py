"""Pre-training loader throughput, side by side in one run; prints one JSON object.

(a) streamed_s3: MDS shards on a loopback moto S3 server through data_pipeline's loader;
(b) ceiling_memory: the same JPEG bytes and captions held in memory, through the same loader
    settings (soho_scale's worker start: batches handed over by shared-memory file name);
(c) naive_files: a torch Dataset over JPEG files + one JSON file on local disk, through torch's
    DataLoader as it comes (batches handed over by file descriptor);
(d) files_same_sharing: (c) with soho_scale's worker start, so that streamed_s3 against it is
    the cost of storage and streaming alone (`ratio_storage_only`);
(e) with `--without PATCH` (repeatable, or `all`): streamed_without_PATCH, (a) with that speed
    patch of data_pipeline/patches off, for what it buys (`ratio_with_patch`).
All use the same SampleProcessor (decode, resize, tokenize, MLM-mask), collate, batch size,
worker count, prefetch and persistent workers.

    .venv/bin/python benchmarks/data_throughput.py --samples 1024 --workers 2 --rounds 5
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing.util
import os
import random
import shutil
import statistics
import tempfile
import time

import psutil
import torch
from PIL import Image, ImageDraw
from streaming import MDSWriter
from torch.utils.data import DataLoader, Dataset

from data_pipeline.collate import collate_captions
from data_pipeline.loader import WorkerInit, build_loader
from data_pipeline.loopback import LocalS3Server
from data_pipeline.patches import guard
from data_pipeline.samples import SampleProcessor
from data_pipeline.settings import PREFETCH_FACTOR
from data_pipeline.streaming import build_dataset
from data_pipeline.transforms import ImageTransform, TextTransform
from soho_scale.pretrained import BUNDLED_BERT, resolve_pretrained

TARGETS = {"ratio_vs_ceiling": 0.9, "ratio_vs_naive": 1.0}  # issue 3
# The speed patches of the streamed path (data_pipeline/patches) that `--without` can turn off.
SPEED_PATCHES = ("streaming_local_fastpath", "streaming_mapped_shards", "streaming_barrier")
COLUMNS = {"source": "str", "split": "str", "image_id": "str", "image": "bytes", "captions": "json"}


def make_images(n: int, width: int, height: int) -> list[bytes]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randrange(width), rng.randrange(height)
            box = (x, y, x + rng.randrange(20, 120), y + rng.randrange(20, 120))
            draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


class MemoryDataset(Dataset):
    """Raw samples in memory: the decode + transform ceiling."""

    def __init__(self, raws: list[dict], processor: SampleProcessor) -> None:
        self.raws, self.processor = raws, processor

    def __len__(self) -> int:
        return len(self.raws)

    def __getitem__(self, i: int) -> dict:
        return self.processor(self.raws[i], i, 0)


class FileDataset(Dataset):
    """The naive baseline: one JPEG file per image plus a JSON list of captions."""

    def __init__(self, folder: str, processor: SampleProcessor) -> None:
        with open(os.path.join(folder, "captions.json")) as f:
            self.captions = json.load(f)
        self.folder, self.processor = folder, processor

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        with open(os.path.join(self.folder, f"{i:06d}.jpg"), "rb") as f:
            raw = {"image": f.read(), "captions": self.captions[i]}
        return self.processor(raw, i, 0)


def tree_cpu_s() -> float:
    """CPU seconds (user + system) of this process and all its children (loader workers)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def epoch_rate(loader) -> tuple[float, float]:
    """(samples/s, CPU microseconds per sample over all processes) of one pass over `loader`."""
    start, cpu, count = time.perf_counter(), tree_cpu_s(), 0
    for batch in loader:
        count += len(batch["sample_ids"])
    return count / (time.perf_counter() - start), (tree_cpu_s() - cpu) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="epochs per variant, interleaved")
    parser.add_argument("--image-size", default="480x360", help="stored JPEG WxH")
    parser.add_argument(
        "--without", action="append", default=[], choices=[*SPEED_PATCHES, "all"],
        help="also measure streamed_s3 with this speed patch off",
    )  # fmt: skip
    args = parser.parse_args()
    without = list(SPEED_PATCHES) if "all" in args.without else args.without
    width, height = map(int, args.image_size.split("x"))
    images = make_images(args.samples, width, height)
    captions = [
        [f"a picture number {i} of shapes", f"colourful blobs {i}"] for i in range(args.samples)
    ]
    processor = SampleProcessor(
        "pretrain",
        image=ImageTransform(128, 192),
        text=TextTransform(resolve_pretrained(BUNDLED_BERT)),
        captions_per_image=2,
    )
    # The loader settings of data_pipeline.loader.build_loader for all, but its worker start.
    common = dict(batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_captions,
                  persistent_workers=True, prefetch_factor=PREFETCH_FACTOR, shuffle=True)  # fmt: skip

    # One private folder, removed at exit: the data, streaming's file locks and
    # multiprocessing's temporary files (it becomes TMPDIR).
    os.environ["TMPDIR"] = tmp = tempfile.mkdtemp(prefix="soho-bench-")
    # After multiprocessing's own exit clean-up of its folder inside it (exitpriority -100).
    multiprocessing.util.Finalize(None, shutil.rmtree, (tmp, True), exitpriority=-101)
    tempfile.tempdir = None
    with LocalS3Server(["bench"]):
        files = os.path.join(tmp, "files")
        os.makedirs(files)
        for i, data in enumerate(images):
            with open(os.path.join(files, f"{i:06d}.jpg"), "wb") as f:
                f.write(data)
        with open(os.path.join(files, "captions.json"), "w") as f:
            json.dump(captions, f)
        with MDSWriter(out="s3://bench/coco", columns=COLUMNS, hashes=["sha1", "xxh64"],
                       size_limit=8 << 20) as writer:  # fmt: skip
            for i, (data, caps) in enumerate(zip(images, captions)):
                writer.write({"source": "bench", "split": "train", "image_id": str(i),
                              "image": data, "captions": caps})  # fmt: skip

        raws = [{"image": d, "captions": c} for d, c in zip(images, captions)]
        dataset = build_dataset(["s3://bench/coco"], processor, os.path.join(tmp, "cache"),
                                args.batch_size, clean_stale_shm=False)  # fmt: skip
        soho = dict(common, worker_init_fn=WorkerInit())
        loaders = {
            "ceiling_memory": DataLoader(MemoryDataset(raws, processor), **soho),
            "naive_files": DataLoader(FileDataset(files, processor), **common),
            "files_same_sharing": DataLoader(FileDataset(files, processor), **soho),
            "streamed_s3": build_loader(
                dataset, args.batch_size, num_workers=args.workers, persistent_workers=True
            ),
        }
        # The first streamed epoch downloads the shards from the S3 server as it goes; later
        # epochs read streaming's local cache (a dataset larger than the cache re-downloads).
        first_epoch, _ = epoch_rate(loaders["streamed_s3"])
        for patch in without:  # its dataset and persistent workers start with the patch off
            guard.set_decision(patch, False)
            off = build_dataset(["s3://bench/coco"], processor, os.path.join(tmp, f"c-{patch}"),
                                args.batch_size, clean_stale_shm=False)  # fmt: skip
            loaders[f"streamed_without_{patch}"] = build_loader(
                off, args.batch_size, num_workers=args.workers, persistent_workers=True
            )
            epoch_rate(loaders[f"streamed_without_{patch}"])
            guard.set_decision(patch, True)
        for name in ("ceiling_memory", "naive_files", "files_same_sharing"):
            epoch_rate(loaders[name])  # start the workers, load the tokenizer, fill page cache
        names = list(loaders)
        per_round: dict[str, list[float]] = {name: [] for name in names}
        cpu_us: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):  # interleaved, rotating order: shared noise hits all
            for name in names[r % len(names) :] + names[: r % len(names)]:
                rate, cpu = epoch_rate(loaders[name])
                per_round[name].append(rate)
                cpu_us[name].append(cpu)
        rates = {name: statistics.median(values) for name, values in per_round.items()}

    ratios = {
        "ratio_vs_ceiling": round(rates["streamed_s3"] / rates["ceiling_memory"], 3),
        "ratio_vs_naive": round(rates["streamed_s3"] / rates["naive_files"], 3),
    }
    storage_only = round(rates["streamed_s3"] / rates["files_same_sharing"], 3)
    with_patch = {
        p: round(rates["streamed_s3"] / rates[f"streamed_without_{p}"], 3) for p in without
    }
    print(json.dumps({
        "samples_per_s": {k: round(v, 1) for k, v in rates.items()},
        "streamed_s3_first_epoch": round(first_epoch, 1),
        "per_round": {k: [round(v, 1) for v in values] for k, values in per_round.items()},
        "cpu_us_per_sample": {k: round(statistics.median(v)) for k, v in cpu_us.items()},
        **ratios,
        "ratio_storage_only": storage_only,
        "ratio_with_patch": with_patch,
        "targets": TARGETS,
        "meets_targets": {k: ratios[k] >= v for k, v in TARGETS.items()},
        "config": {**vars(args), "transform": "soho 128/192", "torch_threads": torch.get_num_threads()},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
