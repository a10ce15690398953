"""SNLI-VE (`snli_ve_{train,dev,test}.jsonl` + Flickr30K images) -> MDS shards.

One sample per (image premise, text hypothesis) pair; labels 0 entailment, 1 neutral,
2 contradiction. The image field: "Flikr30kID" ("<id>.jpg", the released files' spelling) or
"Flickr30K_ID" ("<id>", what the dataset's generator script writes).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from data_pipeline.normalise import clean_text
from data_pipeline.shards import (
    INT_OR_STR,
    STR,
    ShardWriter,
    SkipSample,
    check_record,
    read_image,
    read_json_lines,
    split_from_filename,
)
from data_pipeline.sources.coco import require_folder

COLUMNS = {"image": "bytes", "pair_id": "str", "hypothesis": "str", "label": "int"}
LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
IMAGE_FIELDS = ("Flikr30kID", "Flickr30K_ID")  # the first is named when neither is there


def _image_field(record: dict) -> str:
    return IMAGE_FIELDS[1] if IMAGE_FIELDS[1] in record else IMAGE_FIELDS[0]


def convert_snli_ve(
    jsonl_file: str,
    images_dir: str,
    out: str,
    split: str | None = None,
    **writer_options: Any,
) -> dict[str, Any]:
    records = read_json_lines(jsonl_file)
    required = {"sentence2": STR, "gold_label": STR, "pairID": STR}
    for i, record in enumerate(records):
        check_record(
            record, jsonl_file, f"line {i + 1}", {**required, _image_field(record): INT_OR_STR}
        )
    require_folder(images_dir, "--images")
    split = split or split_from_filename(jsonl_file, prefix="snli_ve_")
    read_cached = lru_cache(maxsize=16)(read_image)  # hypotheses about one image are adjacent

    def build(record: dict) -> dict[str, Any]:
        label = LABELS.get(str(record["gold_label"]).strip().lower())
        if label is None:  # SNLI's "-" (no annotator majority)
            raise SkipSample("unknown_label")
        hypothesis = clean_text(record["sentence2"])
        if not hypothesis:
            raise SkipSample("empty_sentence")
        name = str(record[_image_field(record)])
        if not os.path.splitext(name)[1]:
            name += ".jpg"
        return {
            "image_id": os.path.splitext(name)[0],
            "image": read_cached(images_dir, name),
            "pair_id": str(record["pairID"]),
            "hypothesis": hypothesis,
            "label": label,
        }

    with ShardWriter(out, COLUMNS, "snli_ve", split, **writer_options) as writer:
        writer.convert(records, build)
    return writer.report()
