"""A blank stand-in for an image that did not decode (`sample_valid` False) keeps the batch's shape
but takes no part in training: whatever its pixels, captions and targets, every training step gives
the same loss, the same gradients and the same visual dictionary as for any other content."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from soho_scale import objectives
from soho_scale.model.config import build_config
from soho_scale.model.soho import SohoPretrain
from soho_scale.objectives import PretrainSettings, pretrain_loss
from soho_scale.tasks.classification import ClassificationStep
from soho_scale.tasks.nlvr2 import NLVR2Model
from soho_scale.tasks.retrieval import RetrievalModel, RetrievalStep
from soho_scale.tasks.snli_ve import SNLIVEModel
from soho_scale.tasks.vqa import VQAModel, VQAStep
from tests.model.helpers import make_batch

ANSWERS = 7


def _pretrain(negatives: str) -> tuple[nn.Module, Callable]:
    settings = PretrainSettings(mvm_sample_prob=1.0, itc_weight=0.5, itm_negatives=negatives)
    return SohoPretrain(build_config("tiny")), lambda model, batch: pretrain_loss(
        model, batch, settings
    )


def _step(model: nn.Module, step: type, **kwargs) -> tuple[nn.Module, Callable]:  # noqa: ANN003
    return model, lambda m, batch: step(m, **kwargs)(batch)


CASES = {
    "pretrain": lambda: _pretrain("random"),
    "pretrain_hard": lambda: _pretrain("hard"),
    "retrieval": lambda: _step(
        RetrievalModel(build_config("tiny")), RetrievalStep, hard_negatives=2, itc_weight=0.5
    ),
    "vqa": lambda: _step(VQAModel(build_config("tiny"), ANSWERS), VQAStep),
    "snli_ve": lambda: _step(SNLIVEModel(build_config("tiny")), ClassificationStep),
    "nlvr2": lambda: _step(NLVR2Model(build_config("tiny")), ClassificationStep),
}


def _batch(task: str, valid: list[bool]) -> dict[str, torch.Tensor]:
    """Four images of mixed sizes; two captions each for pre-training and retrieval, one text per
    image (per pair of images for NLVR2) otherwise."""
    captions = 2 if task.startswith("pretrain") or task == "retrieval" else 1
    batch = make_batch(num_images=4, captions_per_image=captions)
    if not task.startswith("pretrain"):
        batch["text_ids"] = torch.where(
            batch["mlm_labels"] != -100, batch["mlm_labels"], batch["text_ids"]
        )
        del batch["mlm_labels"]
    if task == "nlvr2":
        batch["text_ids"], batch["text_mask"] = batch["text_ids"][:2], batch["text_mask"][:2]
        batch["text_image_index"] = torch.tensor([0, 2])
        batch["labels"] = torch.tensor([1, 0])
    elif task == "snli_ve":
        batch["labels"] = torch.tensor([0, 1, 2, 1])
    elif task == "vqa":
        batch["targets"] = torch.rand(4, ANSWERS, generator=torch.Generator().manual_seed(1))
    batch["sample_valid"] = torch.tensor(valid)
    return batch


def _rewritten(task: str, batch: dict[str, torch.Tensor], sample: int) -> dict[str, torch.Tensor]:
    """The batch with other pixels, texts and targets for `sample`, shapes unchanged."""
    g = torch.Generator().manual_seed(99)
    out = {k: v.clone() for k, v in batch.items()}
    images = [2 * sample, 2 * sample + 1] if task == "nlvr2" else [sample]
    for row in images:
        height, width = out["image_sizes"][row].tolist()
        out["images"][row, :, :height, :width] = torch.randint(
            0, 256, (3, height, width), generator=g, dtype=torch.uint8
        )
    owner = torch.arange(len(out["text_ids"])) if task == "nlvr2" else out["text_image_index"]
    rows = owner == sample
    fresh = torch.randint(3000, 4000, out["text_ids"].shape, generator=g)
    words = out["text_mask"].bool() & (out["text_ids"] > 103)  # not [CLS]/[SEP]/[MASK]
    out["text_ids"][rows] = torch.where(words, fresh, out["text_ids"])[rows]
    if "mlm_labels" in out:
        masked = out["mlm_labels"] != -100
        out["mlm_labels"][rows] = torch.where(masked, fresh, out["mlm_labels"])[rows]
    if "labels" in out:
        out["labels"][sample] = (out["labels"][sample] + 1) % (2 if task == "nlvr2" else 3)
    if "targets" in out:
        out["targets"][sample] = 1 - out["targets"][sample]
    return out


def _model(task: str) -> tuple[nn.Module, Callable]:
    torch.manual_seed(0)
    return CASES[task]()


def _dictionary(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.soho.dictionary.named_buffers()}


def _train_step(task: str, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, dict]:
    """One step from the same weights and random draws: (loss, gradients, dictionary)."""
    model, step = _model(task)
    model.train()
    # BatchNorm's batch statistics are the one place where a batch's images meet (its padding
    # meets them there too); running statistics leave the comparison to the losses.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    torch.manual_seed(1)
    loss, _ = step(model, batch)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, _dictionary(model)


@pytest.mark.parametrize("task", list(CASES))
def test_a_blank_stand_in_takes_no_part_in_the_step(task: str, monkeypatch: pytest.MonkeyPatch):
    sample = 1
    valid = [True] * (2 if task == "nlvr2" else 4)
    valid[sample] = False
    batch = _batch(task, valid)
    drawn = []  # pre-training: the image each caption is read with for ITM

    def recorded(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        rows, labels = pair_for_itm(*args, **kwargs)
        drawn.append(rows)
        return rows, labels

    pair_for_itm = objectives.pair_for_itm
    monkeypatch.setattr(objectives, "pair_for_itm", recorded)
    loss, grads, dictionary = _train_step(task, batch)
    other_loss, other_grads, other_dictionary = _train_step(task, _rewritten(task, batch, sample))
    torch.testing.assert_close(other_loss, loss)
    assert loss > 0
    assert grads.keys() == other_grads.keys()
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, missing  # ZeRO expects a gradient for every parameter
    for name, grad in grads.items():
        torch.testing.assert_close(other_grads[name], grad, msg=name)
    assert any(torch.count_nonzero(g) for g in grads.values())
    for name, buffer in dictionary.items():
        torch.testing.assert_close(other_dictionary[name], buffer, msg=name)
    # Random ITM negatives: a decoded caption was read with the stand-in (and left out); hard
    # ones: the stand-in is never drawn.
    decoded = batch["sample_valid"][batch["text_image_index"]] if drawn else None
    read_with_it = [bool((rows[decoded] == sample).any()) for rows in drawn]
    assert read_with_it == {"pretrain": [True, True], "pretrain_hard": [False, False]}.get(task, [])

    # The same rewrite of a sample that did decode changes the step.
    batch["sample_valid"][:] = True
    decoded_loss, _, decoded_dictionary = _train_step(task, batch)
    changed_loss, _, changed_dictionary = _train_step(task, _rewritten(task, batch, sample))
    assert not torch.allclose(changed_loss, decoded_loss)
    assert not torch.equal(changed_dictionary["embed"], decoded_dictionary["embed"])


@pytest.mark.parametrize("task", ["pretrain", "vqa"])
def test_every_sample_decoded_is_the_step_of_a_batch_without_the_column(task: str):
    batch = _batch(task, [True] * 4)
    loss, grads, dictionary = _train_step(task, batch)
    del batch["sample_valid"]
    plain_loss, plain_grads, plain_dictionary = _train_step(task, batch)
    torch.testing.assert_close(loss, plain_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], msg=name)
    for name, buffer in dictionary.items():
        torch.testing.assert_close(buffer, plain_dictionary[name], msg=name)


@pytest.mark.parametrize("task", list(CASES))
def test_a_batch_with_no_decoded_image_trains_nothing_but_still_gives_every_gradient(task: str):
    batch = _batch(task, [False] * (2 if task == "nlvr2" else 4))
    initial = _dictionary(_model(task)[0])
    loss, grads, dictionary = _train_step(task, batch)
    assert loss.item() == 0.0
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads.values())
    # The dictionary is left as it is: before its first update its averages are all 0.
    for name, buffer in initial.items():
        torch.testing.assert_close(dictionary[name], buffer, msg=name)
