"""VQA v2: the official accuracy metric; the answer classifier, its loss, the step module the
trainer wraps and the evaluation (predictions, submission file).

The metric scores as the VQA challenge server does (Cloud-CV/VQA-Evaluation, the EvalAI
implementation behind the published test-dev/test-std numbers): the prediction is normalised
fully (`normalize_answer`: punctuation, lower case, number words, articles, contractions); the
human answers only have punctuation processed (`process_punctuation`), and only when the ten of
them are not all identical. The normalisation lives in `data_pipeline.vqa_answers`, which the
converter builds the answer vocabulary with, so predictions and vocabulary agree.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.vqa_answers import question_accuracy
from soho_scale.model.config import SohoConfig
from soho_scale.model.soho import Soho
from soho_scale.objectives import loss_mean, valid_mean
from soho_scale.tasks.published import read_published
from soho_scale.tasks.visual import fuse_texts_with_images


def vqa_accuracy(predictions: list[str], answers: list[list[str]]) -> float:
    """Official VQA accuracy in percent: the mean of `question_accuracy` over questions."""
    if len(predictions) != len(answers):
        raise ValueError(
            f"vqa: {len(predictions)} predictions but {len(answers)} answer lists; give one each"
        )
    if not predictions:
        raise ValueError("vqa: no predictions to score")
    scores = [question_accuracy(p, a) for p, a in zip(predictions, answers)]
    return 100.0 * sum(scores) / len(scores)


# ---- the task: head, loss, step module, evaluation -------------------------------------------
ANSWER_VOCAB = "answer_vocab.json"  # beside the VQA shards (data_pipeline.sources.vqa)
QUESTION_IDS = "question_ids.json"  # likewise: every question of the split
# The annotations' answer types -> the metric suffix of their accuracy (the server's
# perAnswerType)
ANSWER_TYPES = {"yes/no": "yes_no", "number": "number", "other": "other"}


class VQAModel(nn.Module):
    """Backbone + the official answer classifier on [CLS]: H -> 4H -> ReLU -> Dropout 0.5 -> A."""

    def __init__(self, config: SohoConfig, num_answers: int):
        super().__init__()
        if num_answers < 1:
            raise ValueError(f"vqa: num_answers must be >= 1, got {num_answers}")
        self.config = config
        self.num_answers = num_answers
        self.soho = Soho(config)
        hidden = config.hidden_size
        self.head = nn.Sequential(
            nn.Linear(hidden, 4 * hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(4 * hidden, num_answers),
        )

    def forward(self, batch: dict[str, torch.Tensor], batch_independent: bool = False):
        """batch: images, image_sizes, text_ids, text_mask, text_image_index -> logits (B, A)."""
        pooled = fuse_texts_with_images(
            self.soho,
            batch["images"],
            batch["image_sizes"],
            batch["text_ids"],
            batch["text_mask"],
            batch["text_image_index"],
            batch_independent,
            batch.get("sample_valid"),
        )
        return self.head(pooled)


def vqa_loss(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """BCE with logits on the soft scores, summed over the answers and averaged over the
    questions (the official scaling: the LR does not depend on A); questions `valid` False (their
    image did not decode) are left out."""
    per_answer = F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), reduction="none"
    )
    return loss_mean(per_answer.sum(1), valid)


class VQAStep(nn.Module):
    """What the trainer wraps: forward(batch) -> (loss, {"loss", "vqa_score"})."""

    def __init__(self, model: VQAModel):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logits = self.model(batch)
        valid = batch.get("sample_valid")
        loss = vqa_loss(logits, batch["targets"], valid)
        with torch.no_grad():
            # soft score of the top answer: the training-time proxy of VQA accuracy, in [0, 1]
            top = batch["targets"].gather(1, logits.argmax(1, keepdim=True)).float()
            score = valid_mean(top[:, 0], valid)
        return loss, {"loss": loss.detach(), "vqa_score": score}


def read_answer_vocab(remote: str) -> list[str]:
    """The answer list beside the shards at `remote` (folder or s3:// URL)."""
    from data_pipeline.sources.vqa import read_answer_vocab as read
    from data_pipeline.urls import join_url

    return read(join_url(remote, ANSWER_VOCAB))


def read_question_ids(remotes: list[str]) -> list[int] | None:
    """Every question id of the evaluated splits (`question_ids.json` beside each stream's
    shards, skipped questions included), or None (`tasks.published.read_published`)."""
    return read_published(
        remotes, QUESTION_IDS, "the submission covers only the questions with a sample"
    )


def submission_problems(rows: Any, question_ids: list[int] | None = None) -> list[str]:
    """What makes `rows` unfit for the VQA challenge server's result format
    (`[{"question_id": int, "answer": str}]`, each question of the split exactly once)."""
    if not isinstance(rows, list):
        return ["the results must be a JSON list"]
    problems, seen = [], set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != {"question_id", "answer"}:
            problems.append(f"[{i}]: expected exactly the keys question_id and answer")
            continue
        qid, answer = row["question_id"], row["answer"]
        if not isinstance(qid, int) or isinstance(qid, bool):
            problems.append(f"[{i}]: question_id {qid!r} is not an integer")
        elif qid in seen:
            problems.append(f"[{i}]: question {qid} answered twice")
        seen.add(qid)
        if not isinstance(answer, str):
            problems.append(f"[{i}]: answer {answer!r} is not a string")
    if question_ids is not None:
        missing = len(set(question_ids) - seen)
        extra = len(seen - set(question_ids))
        if missing:
            problems.append(f"{missing} questions of the split are not answered")
        if extra:
            problems.append(f"{extra} answered questions are not in the split")
    return problems


class VQAEvaluation:
    """Per-sample predictions, the official accuracy, the results and submission files."""

    # The 10 raw human answers (the official metric needs them) and the question's answer type
    # (the server's per-type accuracies).
    keep_columns = ("answers", "answer_type")

    def __init__(self, answers: list[str], question_ids: list[int] | None = None):
        self.answers = answers  # most frequent first: answers[0] is the fallback answer
        self.question_ids = question_ids

    def predict(self, model: VQAModel, batch: dict) -> list[dict]:
        logits = model(batch, batch_independent=True)
        best = logits.argmax(1).tolist()
        return [
            {
                "sample_id": int(sample_id),
                "question_id": int(question_id),
                "answer": self.answers[index],
                "human_answers": list(kept["answers"]),
                "answer_type": kept.get("answer_type") or "",
            }
            for sample_id, question_id, index, kept in zip(
                batch["sample_ids"].tolist(), batch["question_ids"].tolist(), best, batch["kept"]
            )
        ]

    def score(self, records: list[dict]) -> dict[str, float]:
        """The official accuracy averages over every question of the split: a question the
        conversion skipped (`question_ids.json` lists it, no record answers it) scores 0, exact
        for the ones skipped because no human answer is in the vocabulary (no answer the model
        can give matches). `vqa_accuracy_scored`: over the questions with a sample alone."""
        answered = [r for r in records if r["human_answers"]]  # test splits have none
        if not answered:
            return {}
        accuracy = vqa_accuracy(
            [r["answer"] for r in answered], [r["human_answers"] for r in answered]
        )
        out = {"vqa_accuracy": accuracy, "scored_questions": float(len(answered))}
        # Per type: over the questions with a sample (the server's perAnswerType when the
        # conversion skipped none; a skipped question's type is not in the shards).
        for answer_type, key in ANSWER_TYPES.items():
            of_type = [r for r in answered if r.get("answer_type") == answer_type]
            if of_type:
                out[f"vqa_accuracy_{key}"] = vqa_accuracy(
                    [r["answer"] for r in of_type], [r["human_answers"] for r in of_type]
                )
        if self.question_ids is not None:
            unscored = len(set(self.question_ids) - {r["question_id"] for r in records})
            out["vqa_accuracy_scored"] = accuracy
            out["unscored_questions"] = float(unscored)
            out["vqa_accuracy"] = accuracy * len(answered) / (len(answered) + unscored)
        return out

    def write_outputs(self, records: list[dict], out_dir: str, split: str) -> list[str]:
        """predictions.json (with per-question accuracy) and the submission file
        `vqa_<split>_submission.json`, checked against the server's format rules first."""
        rows = self.submission(records)
        problems = submission_problems(rows, self.question_ids)
        if problems:
            raise ValueError(f"vqa submission for {split}: {problems[0]}")
        predictions = []
        for r in records:
            row = {"question_id": r["question_id"], "answer": r["answer"]}
            if r["human_answers"]:
                row["accuracy"] = 100.0 * question_accuracy(r["answer"], r["human_answers"])
            predictions.append(row)
        paths = [
            os.path.join(out_dir, "predictions.json"),
            os.path.join(out_dir, f"vqa_{split}_submission.json"),
        ]
        with open(paths[0], "w") as f:
            json.dump(predictions, f)
        with open(paths[1], "w") as f:
            json.dump(rows, f)
        return paths

    def submission(self, records: list[dict]) -> list[dict]:
        """One row per question of the split, in its published order; a question the converter
        skipped (its image missing or corrupt) gets the most frequent training answer."""
        answered = {r["question_id"]: r["answer"] for r in records}
        if self.question_ids is None:
            return [{"question_id": q, "answer": a} for q, a in answered.items()]
        fallback = [q for q in self.question_ids if q not in answered]
        if fallback:
            print(
                f"vqa submission: {len(fallback)} of {len(self.question_ids)} questions had no "
                f"sample (skipped at conversion) and are answered {self.answers[0]!r}",
                flush=True,
            )
        in_split = set(self.question_ids)
        return [
            {"question_id": q, "answer": answered.get(q, self.answers[0])}
            for q in self.question_ids
        ] + [  # answers to questions of another split: `submission_problems` names them
            {"question_id": q, "answer": a} for q, a in answered.items() if q not in in_split
        ]
