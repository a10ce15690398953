"""VQA accuracy: the official normalisation and leave-one-out scoring, checked by hand."""

from __future__ import annotations

import pytest

from data_pipeline.vqa_answers import normalize_answer
from soho_scale.tasks.vqa import question_accuracy, vqa_accuracy


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("none", "0"),
        ("a red", "red"),
        ("An apple", "apple"),
        ("Red.", "red"),
        ("dont", "don't"),
        ("  The  Cat\n", "cat"),
        ("1,000", "1000"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("black/white", "black white"),
        ("x-ray", "x ray"),
        ("red, white", "red white"),
        ("yes!", "yes!"),  # the server only strips punctuation next to spaces/punctuation/letters
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def ten(matching: int, answer: str = "2", other: str = "3") -> list[str]:
    return [answer] * matching + [other] * (10 - matching)


@pytest.mark.parametrize(
    "matching, expected",
    [
        # leave-one-out over the 10 humans, min(matches among the other 9 / 3, 1):
        (0, 0.0),
        (1, 30.0),  # 1 x 0 + 9 x 1/3 = 3 -> 3/10
        (2, 60.0),  # 2 x 1/3 + 8 x 2/3 = 6 -> 6/10
        (3, 90.0),  # 3 x 2/3 + 7 x 1 = 9 -> 9/10
        (4, 100.0),  # 4 x 1 + 6 x 1
        (10, 100.0),
    ],
)
def test_leave_one_out_accuracy(matching, expected):
    assert vqa_accuracy(["2"], [ten(matching)]) == pytest.approx(expected)


def test_prediction_is_normalised_before_matching():
    assert vqa_accuracy(["Two"], [ten(2)]) == pytest.approx(60.0)
    assert vqa_accuracy(["The red."], [ten(3, answer="red", other="blue")]) == pytest.approx(90.0)


def test_human_answers_get_punctuation_only_and_only_when_they_differ():
    # as the official code: mixed answers lose punctuation, so "red." counts as "red" ...
    assert question_accuracy("red", ten(3, answer="red.", other="blue")) == pytest.approx(0.9)
    # ... but ten identical answers are compared as written, and never digit-mapped
    assert question_accuracy("red", ["red."] * 10) == 0.0
    assert question_accuracy("two", ["two"] * 10) == 0.0


def test_mean_over_questions_in_percent():
    predictions = ["yes", "2", "cat"]
    answers = [["yes"] * 10, ten(2), ["dog"] * 10]
    assert vqa_accuracy(predictions, answers) == pytest.approx((100 + 60 + 0) / 3)


def test_mismatched_or_empty_inputs_raise():
    with pytest.raises(ValueError, match="2 predictions but 1 answer lists"):
        vqa_accuracy(["a", "b"], [ten(1)])
    with pytest.raises(ValueError, match="no predictions"):
        vqa_accuracy([], [])
