"""Retrieval recall: against a brute-force ranking where ties count against the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soho_scale.tasks import retrieval
from soho_scale.tasks.retrieval import recall_at_k


def brute_force(scores: np.ndarray, text_to_image: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    """Sort candidates by score, negatives first among equal scores (pessimistic), and look for
    the first positive."""
    num_images, num_texts = scores.shape

    def first_positive(candidates: list[tuple[float, bool]]) -> int:
        order = sorted(candidates, key=lambda c: (-c[0], c[1]))  # ties: negatives (False) first
        return next(i for i, (_, positive) in enumerate(order) if positive)

    image_ranks = [
        first_positive([(scores[i, t], text_to_image[t] == i) for t in range(num_texts)])
        for i in range(num_images)
    ]
    text_ranks = [
        first_positive([(scores[i, t], text_to_image[t] == i) for i in range(num_images)])
        for t in range(num_texts)
    ]
    result = {f"tr_r{k}": 100 * np.mean([r < k for r in image_ranks]) for k in ks}
    result.update({f"ir_r{k}": 100 * np.mean([r < k for r in text_ranks]) for k in ks})
    return result


def random_problem(rng: np.random.Generator, num_images: int, levels: int):
    owners = list(range(num_images)) + list(rng.integers(0, num_images, size=2 * num_images))
    text_to_image = [int(o) for o in rng.permutation(owners)]
    scores = rng.integers(0, levels, size=(num_images, len(text_to_image))).astype(np.float32)
    return scores, text_to_image


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [2, 5, 1000])  # few levels: many ties
def test_matches_brute_force(seed, levels):
    rng = np.random.default_rng(seed)
    scores, text_to_image = random_problem(rng, num_images=int(rng.integers(3, 25)), levels=levels)
    expected = brute_force(scores, text_to_image)
    got = recall_at_k(torch.from_numpy(scores), torch.tensor(text_to_image))
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key]), key
    assert recall_at_k(scores, text_to_image) == got  # numpy in, same answer


def test_blocks_do_not_change_the_result(monkeypatch):
    scores, text_to_image = random_problem(np.random.default_rng(7), num_images=20, levels=4)
    whole = recall_at_k(scores, text_to_image)
    monkeypatch.setattr(retrieval, "_BLOCK", 3)
    assert recall_at_k(scores, text_to_image) == whole


def test_hand_example_and_ties_count_against_the_model():
    # images 0, 1; texts 0, 1 belong to image 0 and text 2 to image 1
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])
    result = recall_at_k(scores, [0, 0, 1], ks=(1, 2))
    # image 0: best own text 0.9, no other higher -> hit@1; image 1: text 1 (0.8) beats its 0.7
    assert result["tr_r1"] == 50.0 and result["tr_r2"] == 100.0
    # text 0 -> image 0 (0.9 > 0.2) hit; text 1: image 1 higher -> miss@1; text 2: 0.7 > 0.5 hit
    assert result["ir_r1"] == pytest.approx(200 / 3) and result["ir_r2"] == 100.0
    constant = recall_at_k(torch.zeros(12, 12), list(range(12)))
    assert all(value == 0.0 for value in constant.values())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="image 1 has no text"):
        recall_at_k(torch.zeros(3, 2), [0, 2])
    with pytest.raises(ValueError, match="3 entries for 2 texts"):
        recall_at_k(torch.zeros(3, 2), [0, 1, 2])
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.full((1, 1), float("nan")), [0])
