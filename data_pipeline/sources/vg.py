"""Visual Genome (`region_descriptions.json` + `image_data.json`) -> caption shards.

Region phrases serve as the image's captions (SOHO pre-trains on COCO + VG captions). One
sample per image; duplicate and empty phrases are dropped.
"""

from __future__ import annotations

import os
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
    read_image,
    read_json,
)
from data_pipeline.sources.coco import require_folder
from data_pipeline.sources.held_out import held_out_images, record_exclusion, vg_image_keys

COLUMNS = {"image": "bytes", "captions": "json"}
# The VG download unpacks into two folders; accept either layout under --images.
_SUBFOLDERS = ("", "VG_100K", "VG_100K_2")


def _image_path(images_dir: str, record: dict, image_id: int) -> str:
    """The image's file relative to `images_dir` (the first layout that has it)."""
    name = os.path.basename(str(record.get("url") or f"{image_id}.jpg"))
    for sub in _SUBFOLDERS:
        if os.path.lexists(os.path.join(images_dir, sub, name)):
            return os.path.join(sub, name)
    return name


def convert_vg(
    regions_file: str,
    image_data_file: str,
    images_dir: str,
    out: str,
    split: str = "train",
    exclude: list[str] | None = None,
    **writer_options: Any,
) -> dict[str, Any]:
    """One sample per image with its phrases. An image that is also one of a downstream val/test
    split of the Karpathy files in `exclude` (its `coco_id` / `flickr_id` in `image_data.json`)
    is skipped as `held_out_downstream` (`data_pipeline.sources.held_out`)."""
    regions = read_json(regions_file)
    image_data = read_json(image_data_file)
    for path, data in ((regions_file, regions), (image_data_file, image_data)):
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of images; is this the right file?")
    for i, entry in enumerate(regions):
        check_record(entry, regions_file, f"[{i}]", {"id": INT, "regions": LIST})
        for j, region in enumerate(entry["regions"]):
            check_record(region, regions_file, f"[{i}].regions[{j}]", {"phrase": STR})
    records = {}
    for i, record in enumerate(image_data):
        # Older releases call the key "id", v1.2+ "image_id".
        key = "image_id" if isinstance(record, dict) and "image_id" in record else "id"
        check_record(record, image_data_file, f"[{i}]", {key: INT}, {"url": STR})
        records[record[key]] = record
    require_folder(images_dir, "--images")
    held_out = held_out_images(exclude or [])
    if held_out and not any("coco_id" in r or "flickr_id" in r for r in records.values()):
        raise DataError(
            f"{image_data_file}: no record has coco_id or flickr_id, so --exclude cannot find "
            "the held-out images; use the image_data.json of Visual Genome v1.2"
        )

    def build(entry: dict) -> dict[str, Any]:
        record = records.get(entry["id"], {})
        if any(key in held_out for key in vg_image_keys(record)):
            raise SkipSample("held_out_downstream")
        phrases: list[str] = []
        seen: set[str] = set()  # as the uncased tokenizer reads them: "A man" == "a  man"
        for region in entry["regions"]:
            phrase = clean_text(region["phrase"])
            key = " ".join(phrase.lower().split())
            if not phrase:
                writer.skipped["empty_caption"] += 1
            elif key not in seen:
                seen.add(key)
                phrases.append(phrase)
        if not phrases:
            raise SkipSample("no_caption")
        image_id = entry["id"]
        image = read_image(images_dir, _image_path(images_dir, record, image_id))
        return {"image_id": str(image_id), "image": image, "captions": phrases}

    with ShardWriter(out, COLUMNS, "vg", split, **writer_options) as writer:
        record_exclusion(writer, exclude)
        writer.convert(regions, build, image_id=lambda entry: entry["id"])
    return writer.report()
