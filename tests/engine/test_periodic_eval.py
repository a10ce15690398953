"""Evaluation while training, the fast parts: the spec's checks (one-line errors at load), the
best-checkpoint record (local and on a real loopback S3) and pruning around it, the training RNG
left as it was by an evaluation, and a probe's evaluation kept out of the training's process
group."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from soho_scale.engine import checkpoint_store as store
from soho_scale.engine.periodic_eval import PeriodicEval, better, training_state_kept
from soho_scale.engine.probes import probe_command, probe_env
from soho_scale.engine.tracking import PARENT_ENV
from soho_scale.spec import SpecError, load_job
from tests.engine.conftest import REPO

PRETRAIN = os.path.join(REPO, "jobs/demo/pretrain.yaml")
SNLI_VE = os.path.join(REPO, "jobs/demo/snli_ve.yaml")
RETRIEVAL = os.path.join(REPO, "jobs/demo/retrieval.yaml")


def _probe(**fields) -> str:
    spec = {"name": "zs", "job": RETRIEVAL, "every_steps": 2, **fields}
    return "eval.probes=[{" + ", ".join(f"{k}: {v}" for k, v in spec.items()) + "}]"


@pytest.mark.parametrize(
    ("path", "overrides", "message"),
    [
        (PRETRAIN, ["eval.every_steps=2"], "eval.every_steps: is for fine-tunes"),
        (SNLI_VE, ["eval.every_steps=2", "eval.streams=[]"], "eval.every_steps: needs eval.str"),
        (SNLI_VE, ["eval.best_metric=acuracy"], "did you mean 'accuracy'"),
        (SNLI_VE, ["eval.best_metric=rsum"], "'rsum' is no snli_ve metric (known: accuracy,"),
        (PRETRAIN, [_probe(job="nope.yaml")], "eval.probes.zs: job nope.yaml: nope.yaml: no such"),
        (PRETRAIN, [_probe(overrides="[eval.split=1, eval.streams=null]")], "eval.probes.zs: job"),
        (PRETRAIN, [_probe(job=PRETRAIN)], "names no eval.streams to evaluate on"),
        (PRETRAIN, [_probe(name="'a b'")], "eval.probes[0].name: string should match"),
        (PRETRAIN, [_probe(every_steps=0)], "eval.probes[0].every_steps: "),
    ],
)
def test_bad_evaluation_settings_fail_at_load_in_one_line(path, overrides, message):
    with pytest.raises(SpecError) as error:
        load_job(path, overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_probe_names_are_unique_and_defaults_apply():
    probe = {"name": "zs", "job": RETRIEVAL, "every_steps": 2}
    twice = f"eval.probes=[{probe}, {probe}]".replace("'", "")
    with pytest.raises(SpecError, match="eval.probes.zs: a second probe of this name"):
        load_job(PRETRAIN, [twice])
    job = load_job(PRETRAIN, [_probe()])
    assert (job.eval.probes[0].nproc, job.eval.probe_wait_s) == (1, 600.0)
    assert load_job(SNLI_VE, ["eval.every_steps=5"]).eval.best_metric is None


def test_the_best_metric_defaults_to_the_tasks_main_one():
    from soho_scale.engine.periodic_eval import best_metric

    assert best_metric(load_job(SNLI_VE)) == "accuracy"
    assert best_metric(load_job(RETRIEVAL)) == "rsum"
    assert best_metric(load_job(RETRIEVAL, ["eval.retrieval_modes=[two_stage]"])) == (
        "two_stage_rsum"
    )
    assert best_metric(load_job(SNLI_VE, ["eval.best_metric=accuracy_neutral"])) == (
        "accuracy_neutral"
    )
    assert better(None, 0.0) and better({"value": 1.0}, 2.0)
    assert not better({"value": 2.0}, 2.0)  # a tie keeps the earlier checkpoint


def _committed(root, *steps: int) -> None:
    for step in steps:
        folder = root / store.tag_for(step)
        folder.mkdir(parents=True)
        (folder / "m.pt").write_bytes(b"x" * step)
        store.write_manifest(str(folder), step, {})


def test_pruning_never_removes_the_best_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    _committed(root, 2, 4)
    store.write_best(str(root), {"step": 2, "metric": "accuracy", "value": 50.0})
    _committed(root, 6, 8)
    store.prune(str(root), keep_last=1)
    assert [c.step for c in store.committed_checkpoints(str(root))] == [2, 8]
    store.write_best(str(root), {"step": 8, "metric": "accuracy", "value": 60.0})
    _committed(root, 10)
    store.prune(str(root), keep_last=1)  # 2 is no longer the best
    assert [c.step for c in store.committed_checkpoints(str(root))] == [8, 10]


def test_the_best_record_lives_beside_s3_checkpoints(s3):
    root = "s3://soho-test/best-record/checkpoints"
    assert store.read_best(root) is None
    record = {"step": 4, "metric": "rsum", "value": 123.5, "location": f"{root}/step_00000004"}
    store.write_best(root, record)
    assert store.read_best(root) == record
    store.clear_best(root)
    assert store.read_best(root) is None


def test_a_fresh_run_forgets_an_old_record_and_a_resumed_one_keeps_it(tmp_path):
    root = tmp_path / "ckpt"
    job = load_job(SNLI_VE, ["eval.every_steps=2", f"checkpoint.dir={root}"])
    record = {"step": 4, "metric": "accuracy", "value": 40.0}
    store.write_best(str(root), record)
    assert PeriodicEval(job, str(tmp_path), 0, 1, 6, None).best == record
    assert PeriodicEval(job, str(tmp_path), 0, 1, 2, None).best is None  # 4 is trained again
    store.write_best(str(root), record)
    assert PeriodicEval(job, str(tmp_path), 0, 1, None, None).best is None
    assert store.read_best(str(root)) is None


def test_an_evaluation_leaves_the_training_rng_streams_and_autotuning_as_they_were(monkeypatch):
    def draw() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as a GPU run trains
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = draw()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    with training_state_kept():
        # what an evaluation draws: a loader's worker seed, dropout, sampling
        iter(torch.utils.data.DataLoader(list(range(4))))
        torch.nn.functional.dropout(torch.ones(8), 0.5)
        draw()
        assert not torch.backends.cudnn.benchmark  # a shape per image size: no autotuning
    assert draw() == expected
    assert torch.backends.cudnn.benchmark


def test_a_probe_runs_outside_the_training_group_and_tracks_into_its_own_store(
    tmp_path, monkeypatch
):
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(PARENT_ENV, "pipeline-run")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    env = probe_env(str(tmp_path))
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT", PARENT_ENV, "TORCHELASTIC_RUN_ID"} & set(env)
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/mlflow.db"


def test_a_probe_caches_its_eval_shards_once_for_all_its_steps(tmp_path):
    job = load_job(PRETRAIN, [_probe(overrides="[eval.split=test]")])
    folder = str(tmp_path / "probes" / "zs" / "step_00000002")
    command = probe_command(job.eval.probes[0], "model.pt", folder)
    at = command.index("eval")
    assert command[at + 1 : at + 4] == [
        RETRIEVAL,
        "eval.split=test",
        f"data.cache_dir={tmp_path}/probes/zs/shard_cache",
    ]
    assert command[at + 4 :] == ["--checkpoint", "model.pt", "--out", folder, "--nproc", "1"]
    own = load_job(PRETRAIN, [_probe(overrides="[data.cache_dir=/cache]")]).eval.probes[0]
    assert not any("shard_cache" in part for part in probe_command(own, "model.pt", folder))
