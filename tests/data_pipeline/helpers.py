"""Shards for data_pipeline tests: caption samples with generated JPEGs, written to a local
folder or the test S3 server (the `s3` fixture of conftest.py), once per URL and session."""

from __future__ import annotations

import io

from PIL import Image
from streaming import MDSWriter

from data_pipeline.samples import SampleProcessor
from data_pipeline.transforms import ImageTransform, TextTransform
from soho_scale.pretrained import BUNDLED_BERT, resolve_pretrained

TOKENIZER = resolve_pretrained(BUNDLED_BERT)

NUM_SAMPLES = 40
COLUMNS = {"source": "str", "split": "str", "image_id": "str", "image": "bytes", "captions": "json"}


def jpeg(i: int) -> bytes:
    image = Image.new("RGB", (40 + 10 * (i % 3), 30 + 20 * (i % 2)), (i * 7 % 255, 100, 50))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def write_shards(
    out: str, n: int = NUM_SAMPLES, corrupt: tuple[int, ...] = (), compression: str | None = None
) -> None:
    """Caption shards in the contract's layout; ~3 samples per shard."""
    with MDSWriter(out=out, columns=COLUMNS, hashes=["sha1", "xxh64"], size_limit=3000,
                   compression=compression) as w:  # fmt: skip
        for i in range(n):
            image = b"\xff\xd8 not a jpeg" if i in corrupt else jpeg(i)
            captions = [f"a photo number {i}", f"picture {i} of a thing", f"image {i}"]
            w.write(
                {
                    "source": "coco",
                    "split": "train",
                    "image_id": str(i),
                    "image": image,
                    "captions": captions,
                }
            )


_written: set[str] = set()  # the `s3` fixture's server lives for the whole session


def dataset_url(name: str, **kwargs) -> str:
    """`s3://shards/<name>`, written on first use."""
    url = f"s3://shards/{name}"
    if url not in _written:
        write_shards(url, **kwargs)
        _written.add(url)
    return url


def processor(task: str = "pretrain") -> SampleProcessor:
    """The pre-training processor at test sizes, with the bundled BERT vocabulary."""
    return SampleProcessor(
        task,
        image=ImageTransform(32, 48),
        text=TextTransform(TOKENIZER),
        captions_per_image=2,
        seed=5,
    )


def epoch_ids(loader) -> list[int]:
    return [i for batch in loader for i in batch["sample_ids"].tolist()]
