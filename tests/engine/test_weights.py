"""init_from: pre-trained backbone weights into task models, with a report of every key."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch import nn

from soho_scale.engine.checkpoint_store import tag_for, write_manifest
from soho_scale.engine.weights import WeightsError, load_initial_weights, resolve_init_from
from soho_scale.model.config import build_config
from soho_scale.model.soho import Soho, SohoPretrain
from soho_scale.preflight import check_init_from
from soho_scale.tasks.snli_ve import SNLIVEModel
from soho_scale.tasks.vqa import VQAModel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[str, SohoPretrain]:
    """A `soho-scale export`-style file of a tiny pre-training model with a used dictionary."""
    torch.manual_seed(1)
    config = build_config("tiny")
    model = SohoPretrain(config)
    model.soho.dictionary.num_updates.fill_(7)  # VD state that must travel with the weights
    model.soho.dictionary.embed.normal_()
    path = tmp_path_factory.mktemp("export") / "model.pt"
    blob = {
        "state_dict": model.state_dict(),
        "config": dataclasses.asdict(config),
        "task": "pretrain",
        "step": 200,
        "source": "runs/x/checkpoints/step_00000200",
    }
    torch.save(blob, path)
    return str(path), model


def test_backbone_loads_heads_are_dropped_and_reported(pretrained, capsys):
    path, source = pretrained
    model = VQAModel(build_config("tiny"), num_answers=5)
    report = load_initial_weights(model, path)
    soho_keys = [k for k in model.state_dict() if k.startswith("soho.")]
    assert report["loaded"] == len(soho_keys)
    assert report["missing"] == sorted(k for k in model.state_dict() if k.startswith("head."))
    assert report["unexpected"] == []
    assert set(report["dropped_heads"]) == {"mlm_head", "mvm_head", "itm_head"}
    assert report["step"] == 200 and report["exported_from"] == "runs/x/checkpoints/step_00000200"
    for key, value in source.soho.state_dict().items():
        torch.testing.assert_close(model.soho.state_dict()[key], value)
    assert int(model.soho.dictionary.num_updates) == 7
    assert '"loaded"' in capsys.readouterr().out  # printed, never silent


def test_a_model_with_an_itm_head_keeps_it(pretrained):
    path, source = pretrained

    class WithItm(nn.Module):  # retrieval's shape: backbone + ITM classifier
        def __init__(self):
            super().__init__()
            self.soho = Soho(build_config("tiny"))
            self.itm_head = nn.Linear(128, 2)

    model = WithItm()
    report = load_initial_weights(model, path)
    assert report["missing"] == [] and set(report["dropped_heads"]) == {"mlm_head", "mvm_head"}
    torch.testing.assert_close(model.itm_head.weight, source.itm_head.weight)


def test_unknown_keys_are_named(tmp_path, pretrained):
    _, source = pretrained
    state = {**source.state_dict(), "extra_head.weight": torch.zeros(2)}
    torch.save({"state_dict": state, "step": 3}, tmp_path / "w.pt")
    report = load_initial_weights(SNLIVEModel(build_config("tiny")), str(tmp_path / "w.pt"))
    assert report["unexpected"] == ["extra_head.weight"]
    assert "head.0.weight" in report["missing"]


def test_another_configuration_is_refused_naming_the_tensor(pretrained):
    path, _ = pretrained
    wider = VQAModel(build_config("tiny", vd_size=64), num_answers=5)
    with pytest.raises(WeightsError, match=r"soho\.dictionary\..*another model configuration"):
        load_initial_weights(wider, path)


def test_a_missing_or_foreign_file_is_a_clear_error(tmp_path):
    model = SNLIVEModel(build_config("tiny"))
    with pytest.raises(WeightsError, match="nope.pt: no such file or folder"):
        load_initial_weights(model, str(tmp_path / "nope.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no committed checkpoint under it"):
        load_initial_weights(model, str(tmp_path / "empty"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="junk.pt: not a weights file"):
        load_initial_weights(model, str(tmp_path / "junk.pt"))


def fake_checkpoint(root, step: int, model: nn.Module) -> str:
    """A committed ZeRO-0 checkpoint of `model` (the module file holds the full weights)."""
    folder = root / tag_for(step)
    folder.mkdir(parents=True)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"module": state}, folder / "mp_rank_00_model_states.pt")
    write_manifest(str(folder), step, {"task": "pretrain", "world_size": 1})
    return str(folder)


def test_a_jobs_checkpoint_folder_gives_its_newest_committed_checkpoint(tmp_path, pretrained):
    _, source = pretrained
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 100, SohoPretrain(build_config("tiny")))
    newest = fake_checkpoint(root, 200, source)
    (root / tag_for(300)).mkdir()  # a checkpoint being written: no manifest, not committed
    assert resolve_init_from(str(root)) == newest
    plan_check = check_init_from(str(root))  # what `soho-scale plan` reports
    assert plan_check.ok and plan_check.detail.endswith(f"newest {newest}")
    assert not check_init_from(str(tmp_path / "nothing")).ok
    model = VQAModel(build_config("tiny"), num_answers=5)
    report = load_initial_weights(model, str(root))
    assert report["step"] == 200
    for key, value in source.soho.state_dict().items():
        assert torch.equal(model.soho.state_dict()[key], value), key


def test_validate_names_a_dangling_init_from_in_one_line(tmp_path, capsys):
    from soho_scale.launch.validate import validate_main

    job = os.path.join(REPO, "jobs/finetune/vqa.yaml")
    missing = tmp_path / "pretrain" / "export" / "model.pt"
    assert validate_main([job, f"model.init_from={missing}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"model.init_from: {missing}: no such file or folder"]
