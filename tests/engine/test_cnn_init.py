"""The CNN's initial weights (`model.overrides.cnn_init`): a torchvision weights file, a name read
from the torch hub cache, or an s3:// object, loaded into the model the trainer builds; random
weights under frozen BatchNorm or frozen stages are refused before anything starts."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torchvision
import yaml

from soho_scale.engine.step import build_step
from soho_scale.engine.weights import WeightsError
from soho_scale.launch.validate import validate_main
from soho_scale.spec import load_job

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "jobs/demo/pretrain.yaml")
PAPER = os.path.join(REPO, "jobs/pretrain/soho_r101_l12_coco_vg.yaml")
# r18-l3's ResNet-18 under a small transformer: the real torchvision layout, quick on CPU.
SMALL_R18 = ["model.preset=r18-l3", "model.overrides.hidden_size=64", "model.overrides.num_heads=4",
             "model.overrides.intermediate_size=128", "model.overrides.num_layers=1",
             "model.overrides.vd_size=32"]  # fmt: skip


def imagenet_like_file(path: str) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-18 state dict with non-default BN statistics, saved to `path`."""
    torch.manual_seed(7)
    state = torchvision.models.resnet18(weights=None).state_dict()
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            value.uniform_(0.5, 1.5)
    torch.save(state, path)
    return state


def assert_trunk_equals(step: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    vision = step.model.soho.vision.state_dict()
    names = {
        "conv1": "stem.0",
        "bn1": "stem.1",
        **{f"layer{i}": f"stages.{i - 1}" for i in (1, 2, 3, 4)},
    }
    compared = 0
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "fc":
            continue
        mine = vision[f"{names[head]}.{rest}"]
        assert torch.equal(mine, value), key
        compared += 1
    assert compared == len(state) - 2  # everything but fc.weight and fc.bias


def test_weights_file_is_the_cnn_after_building_from_the_job(tmp_path):
    state = imagenet_like_file(str(tmp_path / "resnet18.pth"))
    job = load_job(DEMO, [*SMALL_R18, f"model.overrides.cnn_init={tmp_path / 'resnet18.pth'}"])
    assert_trunk_equals(build_step(job), state)


def test_torchvision_name_is_read_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_weight("ResNet18_Weights.IMAGENET1K_V1")
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    state = imagenet_like_file(str(cached))
    job = load_job(DEMO, SMALL_R18)  # the r18-l3 preset names ImageNet weights by default
    assert job.model.config().cnn_init == "ResNet18_Weights.IMAGENET1K_V1"
    assert_trunk_equals(build_step(job), state)
    # a resumed run loads its checkpoint: the initial weights are not even looked for
    cached.unlink()
    build_step(job, initial_weights=False)


def test_missing_cache_file_is_one_line_naming_the_file_and_the_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as caught:
        build_step(load_job(DEMO, SMALL_R18))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("model.overrides.cnn_init ResNet18_Weights.IMAGENET1K_V1: ")
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "get_weight('ResNet18_Weights.IMAGENET1K_V1')" in message


def test_weights_from_s3(s3, tmp_path):
    from data_pipeline.storage import s3_client

    state = imagenet_like_file(str(tmp_path / "resnet18.pth"))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    s3_client().put_object(Bucket="soho-test", Key="cnn/resnet18.pth", Body=buffer.getvalue())
    job = load_job(DEMO, [*SMALL_R18, "model.overrides.cnn_init=s3://soho-test/cnn/resnet18.pth"])
    assert_trunk_equals(build_step(job), state)


def test_a_file_of_another_network_is_refused(tmp_path):
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    job = load_job(DEMO, [*SMALL_R18, f"model.overrides.cnn_init={tmp_path / 'r50.pth'}"])
    with pytest.raises(WeightsError, match=r"^model.overrides.cnn_init .*r50.pth: "):
        build_step(job)


def test_the_paper_job_starts_from_imagenet_weights_as_the_official_code(capsys):
    assert validate_main([PAPER]) == 0
    resolved, _ = yaml.safe_load_all(capsys.readouterr().out)
    overrides = resolved["model"]["overrides"]
    assert overrides["cnn_init"] == "ResNet101_Weights.IMAGENET1K_V1"
    assert overrides["frozen_stages"] == 1 and overrides["bn_policy"] == "train"


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["model.overrides.cnn_init=random"], "frozen_stages: 1 freezes random CNN weights"),
        (
            [
                "model.overrides.cnn_init=random",
                "model.overrides.frozen_stages=-1",
                "model.overrides.bn_policy=frozen",
            ],
            "bn_policy: frozen on random CNN weights",
        ),
    ],  # fmt: skip
)
def test_random_weights_under_frozen_parts_are_refused_by_validate(capsys, overrides, says):
    assert validate_main([PAPER, *overrides]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"model.overrides.cnn_init: {says}")
    # from scratch with nothing frozen is a choice, and allowed
    allowed = ["model.overrides.cnn_init=random", "model.overrides.frozen_stages=-1"]
    assert validate_main([PAPER, *allowed]) == 0


def test_plan_checks_the_weights_are_there(tmp_path, monkeypatch):
    from soho_scale.preflight import check_cnn_init

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    missing = check_cnn_init("ResNet18_Weights.IMAGENET1K_V1", None)
    assert not missing.ok and "resnet18-f37072fd.pth is missing" in missing.detail
    imagenet_like_file(str(tmp_path / "r18.pth"))
    found = check_cnn_init(str(tmp_path / "r18.pth"), None)
    assert found.ok and "r18.pth" in found.detail
    assert check_cnn_init("random", None).ok
