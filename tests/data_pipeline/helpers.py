"""Shards for data_pipeline tests: caption samples with generated JPEGs, written to a local
folder or the test S3 server (the `s3` fixture of conftest.py), once per URL and session."""

from __future__ import annotations

import functools
import io
import struct
import zlib

from PIL import Image
from streaming import MDSWriter

from data_pipeline.samples import SampleProcessor
from data_pipeline.transforms import ImageTransform, TextTransform
from soho_scale.pretrained import BUNDLED_BERT, resolve_pretrained

TOKENIZER = resolve_pretrained(BUNDLED_BERT)

NUM_SAMPLES = 40
COLUMNS = {"source": "str", "split": "str", "image_id": "str", "image": "bytes", "captions": "json"}


@functools.cache
def png_bomb(side: int) -> bytes:
    """A real 1-bit PNG of side x side black pixels: tens of KB on disk, side**2 pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = bytes(1 + (side + 7) // 8)  # filter byte 0 + the packed row
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
            + chunk(b"IEND", b""))  # fmt: skip


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
