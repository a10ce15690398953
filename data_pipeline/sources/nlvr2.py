"""NLVR2 (`train.json` / `dev.json` / `test1.json` JSON lines + PNG pairs) -> MDS shards.

As in the official repo, a statement's images are named after its identifier without the
last component: "train-10171-0-0" -> "train-10171-0-img0.png" / "-img1.png"; training images
sit in numbered sub-folders given by the record's "directory" field.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from data_pipeline.normalise import clean_text
from data_pipeline.shards import (
    INT_OR_STR,
    STR,
    STR_OR_BOOL,
    ShardWriter,
    SkipSample,
    check_record,
    read_image,
    read_json_lines,
    split_from_filename,
)
from data_pipeline.sources.coco import require_folder

COLUMNS = {"image_left": "bytes", "image_right": "bytes", "identifier": "str", "sentence": "str",
           "label": "int"}  # fmt: skip
LABELS = {"true": 1, "false": 0}
# Every statement of the published file, [identifier, label (1, 0 or null)], written beside the
# shards: the evaluation scores the whole split, statements skipped here included, as the
# official script does (it refuses a prediction file that lacks any).
IDENTIFIERS_NAME = "identifiers.json"


def pair_id(identifier: str) -> str:
    """ "train-10171-0-0" -> "train-10171-0" (the image pair a statement is about)."""
    return identifier.rsplit("-", 1)[0]


def sentence_id(identifier: str) -> str | None:
    """ "train-10171-2-0" -> "train-10171-0" (the sentence, the same for every pair of its set);
    None when the identifier is not in NLVR2's `split-set-pair-sentence` form."""
    parts = identifier.split("-")
    return "-".join((parts[0], parts[1], parts[3])) if len(parts) == 4 else None


def image_paths(record: dict) -> tuple[str, str]:
    """The pair's two image files, relative to the split's image folder."""
    prefix = pair_id(str(record["identifier"]))
    folder = str(record.get("directory", ""))
    return tuple(os.path.join(folder, f"{prefix}-img{i}.png") for i in (0, 1))  # type: ignore[return-value]


def convert_nlvr2(
    json_file: str,
    images_dir: str,
    out: str,
    split: str | None = None,
    **writer_options: Any,
) -> dict[str, Any]:
    records = read_json_lines(json_file)
    required = {"identifier": STR, "sentence": STR, "label": STR_OR_BOOL}
    for i, record in enumerate(records):
        check_record(record, json_file, f"line {i + 1}", required, {"directory": INT_OR_STR})
    require_folder(images_dir, "--images")
    split = split or split_from_filename(json_file)
    read_cached = lru_cache(maxsize=16)(read_image)  # statements about one pair are adjacent

    def build(record: dict) -> dict[str, Any]:
        label = LABELS.get(str(record["label"]).strip().lower())
        if label is None:
            raise SkipSample("unknown_label")
        sentence = clean_text(record["sentence"])
        if not sentence:
            raise SkipSample("empty_sentence")
        left, right = image_paths(record)
        return {
            "image_id": pair_id(str(record["identifier"])),
            "image_left": read_cached(images_dir, left),
            "image_right": read_cached(images_dir, right),
            "identifier": str(record["identifier"]),
            "sentence": sentence,
            "label": label,
        }

    with ShardWriter(out, COLUMNS, "nlvr2", split, **writer_options) as writer:
        writer.convert(records, build)
        writer.add_json(
            IDENTIFIERS_NAME,
            [[str(r["identifier"]), LABELS.get(str(r["label"]).strip().lower())] for r in records],
        )
    return writer.report()
