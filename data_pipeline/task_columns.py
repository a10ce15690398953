"""Which shard columns each task's samples are read from (`SampleProcessor`), in the MDS encodings
its converter writes them in, and why a shard folder is not one a task reads.

A job pointed at another dataset's shards (a caption set for SNLI-VE, an image column a foreign
writer stored as `jpeg`) otherwise starts and fails on its first sample with a KeyError, or, for
an image column streaming decodes itself, trains on blank stand-ins. `columns_problem` says so in
one line, from the index alone: the loader (every rank, at dataset build), `plan` and a training
run's periodic evaluation (at the start, not at its first evaluation hours later) ask it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# The columns `SampleProcessor.__call__` reads for each task (evaluation's kept columns are read
# with a default: older shards may lack them).
READS = {
    "pretrain": ("image", "captions"),
    "retrieval": ("image", "captions"),
    "vqa": ("image", "question", "question_id", "answer_labels", "answer_scores"),
    "nlvr2": ("image_left", "image_right", "sentence", "label"),
    "snli_ve": ("image", "hypothesis", "label"),
}
CONVERTERS = {
    "pretrain": "`soho-scale data convert coco` (or `vg`, `karpathy`)",
    "retrieval": "`soho-scale data convert karpathy`",
    "vqa": "`soho-scale data convert vqa`",
    "nlvr2": "`soho-scale data convert nlvr2`",
    "snli_ve": "`soho-scale data convert snli_ve`",
}


# Encodings streaming decodes to the same Python type as the converter's: an integer column reads
# the same however wide it is stored.
_INTEGERS = frozenset(
    ("int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "str_int")
)


def task_columns(task: str) -> dict[str, str]:
    """{column: MDS encoding} a `task` job reads, as its converter writes them."""
    from data_pipeline.sources import coco, karpathy, nlvr2, snli_ve, vqa

    written = {"pretrain": coco.COLUMNS, "retrieval": karpathy.COLUMNS, "vqa": vqa.COLUMNS,
               "nlvr2": nlvr2.COLUMNS, "snli_ve": snli_ve.COLUMNS}[task]  # fmt: skip
    return {name: written[name] for name in READS[task]}


def _reads_as(stored: str, written: str) -> bool:
    return stored == written or (stored in _INTEGERS and written in _INTEGERS)


def columns_problem(columns: Mapping[str, str], task: str) -> str | None:
    """Why shards with `columns` ({name: encoding}) are no data for a `task` job, or None."""
    need = task_columns(task)
    missing = [f"{name} ({encoding})" for name, encoding in need.items() if name not in columns]
    wrong = [
        f"{name} is {columns[name]}, not {encoding}"
        for name, encoding in need.items()
        if name in columns and not _reads_as(columns[name], encoding)
    ]
    if not missing and not wrong:
        return None
    parts = [f"lack {', '.join(missing)}"] if missing else []
    parts += [f"differ: {'; '.join(wrong)}"] if wrong else []
    what = " and ".join(parts)
    return (
        f"its shards' columns ({', '.join(sorted(columns))}) {what}, which a {task} job reads: "
        f"is it {task} data? ({CONVERTERS[task]} writes it)"
    )


def layouts_problem(layouts: Iterable[tuple[list[str], list[str]]], task: str) -> str | None:
    """`columns_problem` for shards given as (column names, encodings), each layout once (a
    folder holds thousands of shards, all alike unless merged), in shard order; or None."""
    kinds = dict.fromkeys(tuple(zip(names, encodings)) for names, encodings in layouts)
    return next(filter(None, (columns_problem(dict(kind), task) for kind in kinds)), None)


def index_columns_problem(index: dict[str, Any], task: str) -> str | None:
    """`columns_problem` for the shards of a parsed (checked) `index.json`, or None."""
    layouts = ((s["column_names"], s["column_encodings"]) for s in index["shards"])
    return layouts_problem(layouts, task)


def check_stream_columns(url: str, task: str) -> None:
    """DataError naming the shard folder `url` when it is no data for a `task` job."""
    from data_pipeline.errors import DataError
    from data_pipeline.storage import read_index

    problem = index_columns_problem(read_index(url), task)
    if problem:
        raise DataError(f"{url}: {problem}")
