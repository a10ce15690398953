"""VQA test-dev/test-std: questions without annotations -> shards -> a result file in the format
the VQA challenge server accepts, with every question of the split answered exactly once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_pipeline.cli import main
from data_pipeline.errors import DataError
from data_pipeline.sources.vqa import QUESTION_IDS_NAME, VOCAB_NAME, convert_vqa
from soho_scale.tasks.vqa import VQAEvaluation, read_question_ids, submission_problems


def _test_dev_split(world: Path, tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    """A test-dev2015 questions file (no annotations file exists) over test2015 image names,
    built from the synthetic train2014 one; one image is missing."""
    source = json.loads((world / "vqa/v2_OpenEnded_mscoco_train2014_questions.json").read_text())
    questions = {**source, "data_subtype": "test-dev2015"}
    questions_file = tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    questions_file.write_text(json.dumps(questions))
    images = tmp_path / "test2015"
    images.mkdir()
    for path in sorted((world / "coco/train2014").iterdir()):
        number = int(path.stem.rsplit("_", 1)[-1])
        shutil.copy(path, images / f"COCO_test2015_{number:012d}.jpg")
    first_image = questions["questions"][0]["image_id"]
    (images / f"COCO_test2015_{first_image:012d}.jpg").unlink()
    return questions_file, images, questions["questions"]


def test_test_dev_converts_without_annotations_and_submits_every_question(
    synthetic_world: Path, synthetic_shards: Path, tmp_path: Path, capsys
) -> None:
    questions_file, images, questions = _test_dev_split(synthetic_world, tmp_path)
    out = tmp_path / "shards"
    with pytest.raises(DataError, match="pass --answer-vocab"):
        convert_vqa(str(questions_file), None, str(images), str(out))
    vocab_file = synthetic_shards / "vqa/train2014" / VOCAB_NAME
    argv = ["convert", "vqa", "--questions", str(questions_file), "--images", str(images),
            "--answer-vocab", str(vocab_file), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    missing = sum(q["image_id"] == questions[0]["image_id"] for q in questions)
    assert report["split"] == "test-dev2015"
    assert report["skipped"] == {"missing_image": missing}
    assert report["written"] == len(questions) - missing
    ids = [q["question_id"] for q in questions]
    assert read_question_ids([str(out)]) == ids  # skipped questions included

    vocab = json.loads(vocab_file.read_text())
    evaluation = VQAEvaluation(vocab, read_question_ids([str(out)]))
    written = [q for q in questions if q["image_id"] != questions[0]["image_id"]]
    records = [{"question_id": q["question_id"], "answer": "blue", "human_answers": []}
               for q in written]  # fmt: skip
    assert evaluation.score(records) == {}  # no answers: the server scores test-dev
    evaluation.write_outputs(records, str(tmp_path), "test-dev2015")
    assert f"{missing} of {len(ids)} questions had no sample" in capsys.readouterr().out
    rows = json.loads((tmp_path / "vqa_test-dev2015_submission.json").read_text())
    assert submission_problems(rows, ids) == []
    assert [r["question_id"] for r in rows] == ids
    assert all(type(r["question_id"]) is int and type(r["answer"]) is str for r in rows)
    fallback = [r for r in rows if r["answer"] == vocab[0]]
    assert len(fallback) == missing


def test_the_format_rules_catch_each_fault(tmp_path: Path) -> None:
    ids = [1, 2, 3]
    good = [{"question_id": q, "answer": "yes"} for q in ids]
    assert submission_problems(good, ids) == []
    assert submission_problems({"1": "yes"}) == ["the results must be a JSON list"]
    assert submission_problems([*good, good[0]], ids) == ["[3]: question 1 answered twice"]
    assert submission_problems(good[:2], ids) == ["1 questions of the split are not answered"]
    extra = [*good, {"question_id": 9, "answer": "no"}]
    assert submission_problems(extra, ids) == ["1 answered questions are not in the split"]
    assert submission_problems([{"question_id": "1", "answer": "yes"}])[0].endswith(
        "is not an integer"
    )
    assert "is not a string" in submission_problems([{"question_id": 1, "answer": 2}])[0]
    keys = [{"question_id": 1, "answer": "yes", "score": 1.0}]
    assert "exactly the keys" in submission_problems(keys)[0]
    evaluation = VQAEvaluation(["yes", "no"], [1, 2])
    with pytest.raises(ValueError, match="answered questions are not in the split"):
        evaluation.write_outputs([{"question_id": 7, "answer": "no", "human_answers": []}],
                                 str(tmp_path), "test-dev2015")  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # nothing written when the submission is unfit


def test_question_ids_file_is_written_beside_every_vqa_conversion(synthetic_shards: Path) -> None:
    ids = json.loads((synthetic_shards / "vqa/val2014" / QUESTION_IDS_NAME).read_text())
    assert ids and all(isinstance(q, int) for q in ids)
