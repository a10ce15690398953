"""Karpathy split files (`dataset_coco.json`, `dataset_flickr30k.json`) -> MDS shards.

One sample per image of the chosen split(s) with its 5 captions: the retrieval test sets
(COCO 5K / 1K, Flickr30K 1K) and the Karpathy train/restval images.
"""

from __future__ import annotations

import os
from typing import Any

from data_pipeline.errors import DataError
from data_pipeline.normalise import clean_text
from data_pipeline.shards import (
    INT_OR_STR,
    LIST,
    STR,
    ShardWriter,
    SkipSample,
    check_record,
    field,
    read_image,
    read_json,
)
from data_pipeline.sources.coco import require_folder
from data_pipeline.sources.held_out import karpathy_dataset

COLUMNS = {"image": "bytes", "captions": "json"}
SPLITS = ("train", "restval", "val", "test")


def convert_karpathy(
    json_file: str,
    images_dir: str,
    out: str,
    split: str = "test",
    **writer_options: Any,
) -> dict[str, Any]:
    """`split` is one Karpathy split or several joined by commas ("train,restval").

    Image path: `images_dir/filepath/filename` (COCO) or `images_dir/filename` (Flickr30K,
    whose file has no `filepath`).
    """
    wanted = [s.strip() for s in split.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SPLITS]
    if unknown or not wanted:
        raise DataError(f"--split {split!r}: use one or more of {', '.join(SPLITS)}")
    data = read_json(json_file)
    images = field(data, "images", json_file, kind=LIST)
    for i, image in enumerate(images):
        required = {"filename": STR, "split": STR, "sentences": LIST}
        optional = {"filepath": STR, "cocoid": INT_OR_STR}
        check_record(image, json_file, f"images[{i}]", required, optional)
        for j, sentence in enumerate(image["sentences"]):
            check_record(sentence, json_file, f"images[{i}].sentences[{j}]", {"raw": STR})
    require_folder(images_dir, "--images")
    chosen = [image for image in images if image["split"] in wanted]

    def build(image: dict) -> dict[str, Any]:
        texts = [clean_text(s["raw"]) for s in image["sentences"]]
        empty = sum(not t for t in texts)
        if empty:
            writer.skipped["empty_caption"] += empty
        texts = [t for t in texts if t]
        if not texts:
            raise SkipSample("no_caption")
        name = os.path.join(image.get("filepath", ""), image["filename"])
        image_bytes = read_image(images_dir, name)
        image_id = image.get("cocoid", os.path.splitext(image["filename"])[0])
        return {"image_id": str(image_id), "image": image_bytes, "captions": texts}

    dataset = karpathy_dataset(data, json_file)
    with ShardWriter(out, COLUMNS, "karpathy", "+".join(wanted), **writer_options) as writer:
        writer.report_extra["dataset"] = str(dataset)
        writer.convert(chosen, build)
    return writer.report()
