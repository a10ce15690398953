"""COCO captions (`annotations/captions_*.json` + image folder) -> MDS shards, one per image."""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any

from data_pipeline.errors import DataError
from data_pipeline.normalise import clean_text
from data_pipeline.shards import (
    INT,
    LIST,
    STR,
    ShardWriter,
    SkipSample,
    check_record,
    field,
    read_image,
    read_json,
    split_from_filename,
)
from data_pipeline.sources.held_out import held_out_images, record_exclusion

COLUMNS = {"image": "bytes", "captions": "json"}
# COCO_train2014_000000000009.jpg -> 9 (VQA and the Karpathy file name images this way too).
_TRAILING_ID = re.compile(r"(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


def require_folder(path: str, flag: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"{flag} {path}: not a folder; give the folder holding the images")


def coco_image_index(images_dir: str) -> dict[int, str]:
    """COCO image id -> file name in `images_dir`, from the numbers at the end of the names."""
    require_folder(images_dir, "--images")
    index = {}
    for name in sorted(os.listdir(images_dir)):
        match = _TRAILING_ID.search(name)
        if match:
            index[int(match.group(1))] = name
    return index


def group_captions(annotations: list[dict], skipped: Counter[str]) -> dict[Any, list[str]]:
    """image id -> its non-empty captions, in file order; empty ones counted in `skipped`."""
    by_image: dict[Any, list[str]] = {}
    for a in annotations:
        caption = clean_text(a["caption"])
        if not caption:
            skipped["empty_caption"] += 1
            continue
        by_image.setdefault(a["image_id"], []).append(caption)
    return by_image


def convert_coco(
    captions_file: str,
    images_dir: str,
    out: str,
    split: str | None = None,
    exclude: list[str] | None = None,
    **writer_options: Any,
) -> dict[str, Any]:
    """Write one sample per image with all its captions; returns the conversion report.

    `empty_caption` in the report counts captions dropped; an image left with no caption is
    skipped as `no_caption`, one of a downstream val/test split of the Karpathy files in
    `exclude` as `held_out_downstream` (`data_pipeline.sources.held_out`).
    """
    data = read_json(captions_file)
    images = field(data, "images", captions_file, kind=LIST)
    annotations = field(data, "annotations", captions_file, kind=LIST)
    for i, image in enumerate(images):
        check_record(image, captions_file, f"images[{i}]", {"id": INT, "file_name": STR})
    for i, a in enumerate(annotations):
        check_record(a, captions_file, f"annotations[{i}]", {"image_id": INT, "caption": STR})
    require_folder(images_dir, "--images")
    split = split or split_from_filename(captions_file, prefix="captions_")
    held_out = held_out_images(exclude or [])

    with ShardWriter(out, COLUMNS, "coco", split, **writer_options) as writer:
        by_image = group_captions(annotations, writer.skipped)
        listed = {image["id"] for image in images}
        orphans = sum(len(texts) for image_id, texts in by_image.items() if image_id not in listed)
        if orphans:
            writer.skipped["caption_without_image"] += orphans

        def build(image: dict) -> dict[str, Any]:
            if ("coco", image["id"]) in held_out:
                raise SkipSample("held_out_downstream")
            texts = by_image.get(image["id"])
            if not texts:
                raise SkipSample("no_caption")
            image_bytes = read_image(images_dir, image["file_name"])
            return {"image_id": str(image["id"]), "image": image_bytes, "captions": texts}

        record_exclusion(writer, exclude)
        writer.convert(images, build, image_id=lambda image: image["id"])
    return writer.report()
