"""A job pointed at shards that are not its task's data is one line naming the stream and the
columns, from the loader (before any sample is read) and from `plan`'s stream check."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from data_pipeline.errors import DataError
from data_pipeline.shards import COMMON_COLUMNS
from data_pipeline.sources import coco, karpathy, nlvr2, snli_ve, vg, vqa
from data_pipeline.streaming import build_dataset
from data_pipeline.task_columns import READS, columns_problem, task_columns
from soho_scale.preflight import check_stream
from tests.data_pipeline.helpers import jpeg, processor, write_shards

REPO = Path(__file__).resolve().parents[2]
WRITTEN = {"pretrain": [coco, vg, karpathy], "retrieval": [karpathy], "vqa": [vqa],
           "nlvr2": [nlvr2], "snli_ve": [snli_ve]}  # fmt: skip
VALUES = {"image": jpeg(0), "image_left": jpeg(1), "image_right": jpeg(2), "captions": ["a b"],
          "question": "is it red", "question_id": 7, "answer_labels": [1], "answer_scores": [1.0],
          "sentence": "two dogs", "hypothesis": "a dog", "label": 1}  # fmt: skip


@pytest.mark.parametrize("task", sorted(READS))
def test_each_converter_writes_what_its_task_reads_and_the_processor_needs_nothing_more(task):
    for source in WRITTEN[task]:
        assert columns_problem({**COMMON_COLUMNS, **source.COLUMNS}, task) is None, source
    # a sample holding only the columns the check asks for is processed
    step = dataclasses.replace(processor(task), num_answers=3 if task == "vqa" else 0)
    out = step({name: VALUES[name] for name in task_columns(task)}, sample_id=0, epoch=0)
    assert out["valid"]


def test_other_tasks_data_and_other_encodings_are_named():
    captions = {**COMMON_COLUMNS, **coco.COLUMNS}
    assert columns_problem(captions, "snli_ve") == (
        "its shards' columns (captions, image, image_id, source, split) lack hypothesis (str), "
        "label (int), which a snli_ve job reads: is it snli_ve data? (`soho-scale data convert "
        "snli_ve` writes it)"
    )
    foreign = {**captions, "image": "jpeg"}  # streaming would hand over a decoded PIL image
    assert "differ: image is jpeg, not bytes" in columns_problem(foreign, "pretrain")
    both = columns_problem({"image": "png"}, "retrieval")
    assert "lack captions (json) and differ: image is png, not bytes" in both
    # integers read alike however wide they are stored
    wide = {**COMMON_COLUMNS, **snli_ve.COLUMNS, "label": "uint8"}
    assert columns_problem(wide, "snli_ve") is None
    assert "label is str, not int" in columns_problem({**wide, "label": "str"}, "snli_ve")


def test_the_loader_and_plan_refuse_another_tasks_shards(tmp_path):
    folder = str(tmp_path / "captions")
    write_shards(folder, n=8)
    build_dataset([folder], processor("pretrain"), str(tmp_path / "c0"), 2)  # its own task
    with pytest.raises(DataError) as error:
        build_dataset([folder], processor("snli_ve"), str(tmp_path / "c1"), 2)
    message = str(error.value)
    assert message.startswith(f"{folder}: its shards' columns (captions, image, image_id, source")
    assert "\n" not in message and "lack hypothesis (str), label (int)" in message
    check, samples = check_stream(folder, None, "snli_ve")
    assert not check.ok and check.detail == message[len(folder) + 2 :] and samples == 8
    assert check_stream(folder, None, "retrieval")[0].ok


def test_a_fine_tune_evaluating_while_it_trains_checks_its_eval_data_when_it_starts(tmp_path):
    """Not at its first evaluation, possibly hours into training."""
    from soho_scale.engine.periodic_eval import check_eval_data
    from soho_scale.spec import load_job

    folder = str(tmp_path / "captions")
    write_shards(folder, n=8)
    job = load_job(REPO / "jobs" / "demo" / "snli_ve.yaml",
                   [f"eval.streams.0.remote={folder}", "eval.every_steps=5",
                    f"checkpoint.dir={tmp_path / 'checkpoints'}"])  # fmt: skip
    with pytest.raises(DataError, match=f"^{folder}: its shards' columns .* lack hypothesis"):
        check_eval_data(job)
    # one that evaluates only in a later stage (a pipeline's eval stage) is checked there
    at_end = load_job(REPO / "jobs" / "demo" / "snli_ve.yaml", [f"eval.streams.0.remote={folder}"])
    check_eval_data(at_end)
