"""The VQA answer normalisation pinned on real-looking VQA v2 answers: the answer vocabulary and
the soft targets are built with it, so a change to any of these outputs changes the vocabulary
and must be deliberate (regenerate vqa_answers.json and say why)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline.sources.vqa import build_answer_vocab, soft_targets
from data_pipeline.vqa_answers import normalize_answer

CASES = json.loads((Path(__file__).with_name("vqa_answers.json")).read_text(encoding="utf-8"))


@pytest.mark.parametrize("group", sorted(CASES))
def test_pinned_outputs(group: str) -> None:
    wrong = [(raw, normalize_answer(raw), want) for raw, want in CASES[group]
             if normalize_answer(raw) != want]  # fmt: skip
    assert wrong == []


def test_a_normalised_answer_normalises_to_itself() -> None:
    # The metric normalises a predicted vocabulary entry again before comparing it.
    outputs = [want for pairs in CASES.values() for _, want in pairs]
    assert [a for a in outputs if normalize_answer(a) != a] == []


def test_vocabulary_and_soft_targets_keep_what_the_server_keeps() -> None:
    # A trailing "!" and a hyphen between digits stay; "Yes." and "yes" fold together.
    annotations = [{"multiple_choice_answer": a} for a in ("yes!", "1-2", "Yes.", "yes", "a")]
    vocab = build_answer_vocab(annotations, min_count=1)
    assert vocab == ["yes", "1-2", "yes!"]  # most frequent first; "a" normalises to ""
    index = {a: i for i, a in enumerate(vocab)}
    # as the metric scores them: "Yes!" (a human answer keeps its case) is neither
    labels, scores = soft_targets(["yes!", "yes!", "Yes!", "yes", "1 2"], index)
    assert labels == [0, 2] and scores == pytest.approx([4 / 15, 8 / 15])
