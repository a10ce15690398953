"""Images of the downstream evaluation splits, kept out of pre-training data.

Visual Genome shares about 51K images with COCO train/val 2014 and some with Flickr30K, and the
Karpathy val/test images (the retrieval test sets) come from COCO val2014 and Flickr30K. SOHO
pre-trains on UNITER's in-domain data, which drops every image of a downstream val or test
split; otherwise the MSCOCO and Flickr30K retrieval rows score images the model was pre-trained
on. `--exclude dataset_coco.json --exclude dataset_flickr30k.json` on `data convert coco|vg`
reads the Karpathy files the retrieval shards come from.
"""

from __future__ import annotations

import os
from typing import Any

from data_pipeline.errors import DataError
from data_pipeline.shards import (
    INT_OR_STR,
    LIST,
    STR,
    ShardWriter,
    check_record,
    field,
    read_json,
)

HELD_OUT_SPLITS = ("val", "test")
# The key a held-out image is known by: ("coco", COCO image id) or ("flickr", Flickr photo id).
ImageKey = tuple[str, int]


def _number(value: Any) -> int | None:
    """An id as an int; None for what is not a whole number ("abc", None, true)."""
    if isinstance(value, bool):
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def karpathy_dataset(data: Any, path: str) -> str:
    """Which dataset a Karpathy split file splits: its `dataset` field ("coco", "flickr30k"),
    else its name (dataset_flickr30k.json)."""
    named = data.get("dataset") if isinstance(data, dict) else None
    if named:
        return str(named).lower()
    return "flickr30k" if "flickr30k" in os.path.basename(path).lower() else "coco"


def held_out_images(
    karpathy_files: list[str], splits: tuple[str, ...] = HELD_OUT_SPLITS
) -> set[ImageKey]:
    """The images of `splits` in Karpathy split files (`dataset_coco.json`: by `cocoid`;
    `dataset_flickr30k.json`: by the photo id its file name carries)."""
    keys: set[ImageKey] = set()
    for path in karpathy_files:
        data = read_json(path)
        images = field(data, "images", path, kind=LIST)
        dataset = karpathy_dataset(data, path)
        if dataset not in ("coco", "flickr30k"):
            raise DataError(f"{path}: --exclude takes the COCO or Flickr30K Karpathy file, "
                            f"not dataset {dataset!r}")  # fmt: skip
        for i, image in enumerate(images):
            check_record(image, path, f"images[{i}]", {"filename": STR, "split": STR},
                         {"cocoid": INT_OR_STR})  # fmt: skip
            if image["split"] not in splits:
                continue
            # COCO's file gives each image's cocoid; Flickr30K's names the photo by its id.
            raw = image.get("cocoid") if dataset == "coco" else image["filename"].split(".")[0]
            number = _number(raw)
            if number is None:
                what = "no cocoid" if dataset == "coco" else f"no photo id in {image['filename']!r}"
                raise DataError(f"{path}: images[{i}]: {what}")
            keys.add(("coco" if dataset == "coco" else "flickr", number))
    return keys


def vg_image_keys(record: dict[str, Any]) -> list[ImageKey]:
    """The COCO and Flickr images a Visual Genome `image_data.json` record is (`coco_id`,
    `flickr_id`; null when it is neither)."""
    keys = []
    for name, kind in (("coco_id", "coco"), ("flickr_id", "flickr")):
        number = _number(record.get(name))
        if number is not None:
            keys.append((kind, number))
    return keys


def record_exclusion(writer: ShardWriter, exclude: list[str] | None) -> None:
    """Say in the conversion report which files held images out (or that none did)."""
    writer.report_extra["held_out_from"] = {
        "files": [os.path.basename(p) for p in exclude or []],
        "splits": list(HELD_OUT_SPLITS),
    }
