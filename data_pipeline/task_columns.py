"""Which shard columns each task's samples are read from (`SampleProcessor`), in the MDS encodings
its converter writes them in, and why a shard folder is not one a task reads.

A job pointed at another dataset's shards (a caption set for SNLI-VE, an image column a foreign
writer stored as `jpeg`) otherwise starts and fails on its first sample with a KeyError, or, for
an image column streaming decodes itself, trains on blank stand-ins. `columns_problem` says so in
one line, from the index alone: the loader (every rank, at dataset build) and `plan` ask it.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def task_columns(task: str) -> dict[str, str]:
    """{column: MDS encoding} a `task` job reads, as its converter writes them."""
    from data_pipeline.sources import coco, nlvr2, snli_ve, vqa

    written = {"pretrain": coco.COLUMNS, "retrieval": coco.COLUMNS, "vqa": vqa.COLUMNS,
               "nlvr2": nlvr2.COLUMNS, "snli_ve": snli_ve.COLUMNS}[task]  # fmt: skip
    return {name: written[name] for name in READS[task]}


def columns_problem(columns: Mapping[str, str], task: str) -> str | None:
    """Why shards with `columns` ({name: encoding}) are no data for a `task` job, or None."""
    need = task_columns(task)
    missing = [f"{name} ({encoding})" for name, encoding in need.items() if name not in columns]
    wrong = [
        f"{name} is {columns[name]}, not {encoding}"
        for name, encoding in need.items()
        if name in columns and columns[name] != encoding
    ]
    if not missing and not wrong:
        return None
    what = f"lack {', '.join(missing)}" if missing else f"differ: {'; '.join(wrong)}"
    return (
        f"its shards' columns ({', '.join(sorted(columns))}) {what}, which a {task} job reads: "
        f"is it {task} data? ({CONVERTERS[task]} writes it)"
    )
