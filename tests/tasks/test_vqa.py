"""VQA: the answer classifier, the official loss scaling, outputs, and fine-tuning that beats the
untrained model. (The metric itself is tested in test_vqa_metric.py.)"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from data_pipeline import vqa_answers
from data_pipeline.sources import vqa as vqa_source
from soho_scale.model.config import build_config
from soho_scale.tasks import vqa as vqa_task
from soho_scale.tasks.vqa import VQAEvaluation, VQAModel, VQAStep, vqa_loss
from tests.tasks.conftest import demo_job, finetune


def _batch(num_answers: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    targets = torch.zeros(2, num_answers)
    targets[0, 3], targets[1, 1], targets[1, 2] = 1.0, 0.3, 1.0
    return {
        "images": torch.randn(2, 3, 64, 96),
        "image_sizes": torch.tensor([[64, 96], [64, 64]]),
        "text_ids": torch.randint(1000, 2000, (2, 8)),
        "text_mask": torch.ones(2, 8, dtype=torch.long),
        "text_image_index": torch.arange(2),
        "targets": targets,
    }


@pytest.mark.parametrize("vd_fusion", ["gate", "none"])
def test_official_head_and_loss(vd_fusion: str):
    model = VQAModel(build_config("tiny", vd_fusion=vd_fusion), num_answers=7)
    hidden = model.config.hidden_size
    layers = [type(m).__name__ for m in model.head]
    assert layers == ["Linear", "ReLU", "Dropout", "Linear"]
    assert model.head[0].out_features == 4 * hidden and model.head[2].p == 0.5
    batch = _batch(7)
    loss, metrics = VQAStep(model)(batch)
    assert model(batch).shape == (2, 7)
    assert set(metrics) == {"loss", "vqa_score"} and all(v.ndim == 0 for v in metrics.values())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    logits = torch.randn(2, 7)
    # BCE summed over answers, averaged over questions (the official `* num_answers`)
    expected = F.binary_cross_entropy_with_logits(logits, batch["targets"], reduction="sum") / 2
    torch.testing.assert_close(vqa_loss(logits, batch["targets"]), expected)


def test_vocabulary_and_metric_share_one_normalisation():
    assert vqa_source.normalize_answer is vqa_answers.normalize_answer
    assert vqa_task.question_accuracy is vqa_answers.question_accuracy
    # "1-2" stays "1-2" in the vocabulary and the soft targets, so predicting it scores
    humans = ["1-2"] * 3 + ["3"] * 7
    vocab = vqa_source.build_answer_vocab([{"multiple_choice_answer": "1-2"}], min_count=1)
    assert vocab == ["1-2"] and vqa_source.soft_targets(humans, {"1-2": 0}) == ([0], [0.9])
    assert vqa_task.question_accuracy(vocab[0], humans) == pytest.approx(0.9)


def test_question_ids_missing_is_none_but_unreachable_storage_is_an_error(
    tmp_path, monkeypatch, capsys
):
    from botocore.exceptions import ClientError, EndpointConnectionError

    from data_pipeline import storage
    from data_pipeline.errors import DataError

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "question_ids.json").write_text("[3, 1, 2]")
    assert vqa_task.read_question_ids([str(tmp_path / "a")]) == [3, 1, 2]
    assert vqa_task.read_question_ids([str(tmp_path / "a"), str(tmp_path / "old")]) is None

    def refused(url, client=None):  # noqa: ANN001, ANN202
        cause = ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject")
        raise DataError(f"{url}: cannot read (AccessDenied)") from cause

    def unreachable(url, client=None):  # noqa: ANN001, ANN202
        raise DataError(f"{url}: storage endpoint unreachable") from EndpointConnectionError(
            endpoint_url="http://storage:9000"
        )

    monkeypatch.setattr(storage, "read_bytes", refused)  # a missing key without ListBucket
    assert vqa_task.read_question_ids(["s3://b/vqa/test-dev2015"]) is None
    assert "AccessDenied" in capsys.readouterr().out
    monkeypatch.setattr(storage, "read_bytes", unreachable)
    with pytest.raises(DataError, match="unreachable"):
        vqa_task.read_question_ids(["s3://b/vqa/test-dev2015"])


def test_only_rank_0_reads_the_published_question_list(monkeypatch):
    """Rank 0 alone scores, so the other ranks read no list: one read per evaluation, and no
    storage error on it can stop one rank of many while the others wait at a collective."""
    from data_pipeline import storage
    from soho_scale.spec import load_job
    from soho_scale.tasks import build_task_evaluation
    from tests.tasks.conftest import REPO

    job = load_job(REPO / "jobs/demo/vqa.yaml", ["eval.streams.0.remote=s3://b/vqa/test-dev2015"])
    reads: list[str] = []

    def read_bytes(url, client=None):  # noqa: ANN001, ANN202
        reads.append(url)
        return b"[1, 2]" if url.endswith("question_ids.json") else b'["yes", "no"]'

    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    assert build_task_evaluation(job, rank=1).question_ids is None
    assert not any(url.endswith("question_ids.json") for url in reads)
    assert build_task_evaluation(job, rank=0).question_ids == [1, 2]
    assert "s3://b/vqa/test-dev2015/question_ids.json" in reads


def test_outputs_score_with_human_answers_and_write_a_submission(tmp_path):
    evaluation = VQAEvaluation(["yes", "no", "2"])
    records = [
        {"sample_id": 0, "question_id": 11, "answer": "yes", "human_answers": ["yes"] * 10},
        {"sample_id": 1, "question_id": 12, "answer": "2", "human_answers": ["2"] * 2 + ["3"] * 8},
        {"sample_id": 2, "question_id": 13, "answer": "no", "human_answers": []},  # test split
    ]
    metrics = evaluation.score(records)
    assert metrics["scored_questions"] == 2
    assert metrics["vqa_accuracy"] == pytest.approx(100 * (1 + 0.6) / 2)
    assert "vqa_accuracy_yes_no" not in metrics  # records without types: no per-type numbers
    typed = [{**r, "answer_type": t} for r, t in zip(records, ("yes/no", "number", ""))]
    per_type = evaluation.score(typed)
    assert per_type["vqa_accuracy_yes_no"] == 100 and per_type["vqa_accuracy_number"] == 60
    assert "vqa_accuracy_other" not in per_type
    # Scored against the whole split: two more questions the conversion skipped count 0.
    whole = VQAEvaluation(["yes", "no", "2"], question_ids=[11, 12, 13, 14, 15]).score(records)
    assert whole["vqa_accuracy"] == pytest.approx(100 * (1 + 0.6) / 4)
    assert whole["vqa_accuracy_scored"] == pytest.approx(metrics["vqa_accuracy"])
    assert whole["unscored_questions"] == 2 and whole["scored_questions"] == 2
    paths = evaluation.write_outputs(records, str(tmp_path), "test-dev2015")
    submission = json.loads((tmp_path / "vqa_test-dev2015_submission.json").read_text())
    assert str(tmp_path / "vqa_test-dev2015_submission.json") in paths
    assert submission == [
        {"question_id": 11, "answer": "yes"},
        {"question_id": 12, "answer": "2"},
        {"question_id": 13, "answer": "no"},
    ]


@pytest.mark.slow
def test_finetuning_beats_the_untrained_model(task_shards):
    # The question type fixes the answer family (yes/no, colour, count): a few steps learn it.
    # Measured: 7.3 -> 22.1 after 80 steps, 27.3 after 120 (40 steps: 14.6, only "yes" learned).
    job = demo_job("vqa", task_shards)
    _, before, after = finetune(job, steps=120, lr=1e-3)
    assert after["num_samples"] == before["num_samples"] == 48
    assert after["vqa_accuracy"] >= before["vqa_accuracy"] + 10, (before, after)
