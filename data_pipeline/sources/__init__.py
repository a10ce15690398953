"""One converter per published dataset format; each writes MDS shards.

`dataset_name(report)`: the published dataset a conversion report's shards come from, as the
paper's tables name it (the report keys results by it).
"""

from __future__ import annotations

from typing import Any

_NAMES = {
    "vqa": "VQA v2",
    "nlvr2": "NLVR2",
    "snli_ve": "SNLI-VE",
    "coco": "MSCOCO",
    "flickr30k": "Flickr30K",
    "vg": "Visual Genome",
}


def dataset_name(report: dict[str, Any]) -> str:
    """ "MSCOCO" / "Flickr30K" for Karpathy splits (their `dataset`), else the source's name."""
    key = report.get("dataset") or report.get("source") or "unknown"
    return _NAMES.get(str(key).lower(), str(key))
