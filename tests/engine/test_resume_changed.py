"""Resuming with a changed spec (soho_scale.engine.resume_check): refused with one line naming
each changed key, unless every change is safe or checkpoint.resume_changed is set; recorded in
the run either way."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from soho_scale.engine import resume_check
from soho_scale.spec import SpecError, load_job
from tests.engine.conftest import REPO, metrics_lines, run_train

DEMO = os.path.join(REPO, "jobs/demo/pretrain.yaml")


def _tags(ckpt) -> list[str]:
    return sorted(p.name for p in ckpt.glob("step_*"))


def _run_id(run_dir: str) -> str:
    """The MLflow run the job's last launch logged to."""
    with open(os.path.join(run_dir, "tracking.json")) as f:
        return json.load(f)["run_id"]


def _saved(*overrides: str) -> dict:
    # What a manifest holds after its JSON round trip.
    return json.loads(json.dumps(resume_check.spec_tree(load_job(DEMO, list(overrides)))))


def test_unsafe_changes_are_refused_naming_each_key_with_both_values():
    job = load_job(DEMO, ["optim.rest.lr=2e-3", "batch.global_batch=64", "schedule.steps=900"])
    with pytest.raises(SpecError) as refused:
        resume_check.check(job, {"spec": _saved()}, "s3://b/ckpt/step_00000200")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("resume refused: spec changed since the checkpoint s3://b/ckpt/")
    assert "optim.rest.lr 0.001 -> 0.002, batch.global_batch 32 -> 64;" in message
    assert "schedule.steps" not in message  # safe: not what blocks the resume
    assert message.endswith("set checkpoint.resume_changed=true to resume anyway")


def test_safe_changes_and_an_unchanged_spec_resume():
    assert resume_check.check(load_job(DEMO), {"spec": _saved()}, "ckpt") == ()
    job = load_job(
        DEMO,
        [
            "schedule.steps=900",
            "tracking.log_every=1",
            "tracking.experiment=other",
            "eval.split=test",
            "checkpoint.interval_steps=50",
            "checkpoint.dir=s3://moved/ckpt",
            "data.download_retry=9",
            "resources.procs_per_node=1",
        ],
    )
    changes = resume_check.check(job, {"spec": _saved()}, "ckpt")
    assert len(changes) == 8 and all(c.safe for c in changes)


def test_a_key_the_checkpoint_predates_resumes_at_its_default_only():
    # A checkpoint written before objectives.itm_negatives existed.
    saved = _saved()
    del saved["objectives"]["itm_negatives"]
    assert resume_check.check(load_job(DEMO), {"spec": saved}, "ckpt") == ()
    with pytest.raises(SpecError, match=r"objectives.itm_negatives \(absent\) -> hard"):
        resume_check.check(load_job(DEMO, ["objectives.itm_negatives=hard"]), {"spec": saved}, "c")


def test_every_safe_key_alone_resumes_and_every_other_section_is_refused():
    safe = [
        "schedule.steps=900",
        "tracking.tags.team=vision",
        "eval.retrieval_k=4",
        "checkpoint.keep_last=9",
        "data.stall_timeout_s=600",
        "resources.exclusive=false",
        "name=renamed",
    ]
    for override in safe:
        (change,) = resume_check.check(load_job(DEMO, [override]), {"spec": _saved()}, "ckpt")
        assert change.safe and change.key == override.partition("=")[0]
    unsafe = [
        "seed=1",
        "model.overrides.vd_size=64",
        "data.streams=[{remote: s3://other/shards}]",
        "data.workers=2",
        "objectives.itc_weight=0.5",
        "optim.cnn.momentum=0.8",
        "schedule.warmup_steps=5",
        "schedule.decay_steps=[600,700]",
        "precision=bf16",
        "deepspeed.zero_stage=1",
    ]
    for override in unsafe:
        key = re.escape(override.partition("=")[0])
        with pytest.raises(SpecError, match=rf"^resume refused: .*: {key}[ .\[]"):
            resume_check.check(load_job(DEMO, [override]), {"spec": _saved()}, "ckpt")


def test_resume_changed_true_allows_an_unsafe_change():
    job = load_job(DEMO, ["optim.rest.lr=2e-3", "checkpoint.resume_changed=true"])
    changes = resume_check.check(job, {"spec": _saved()}, "ckpt")
    assert [str(c) for c in changes] == [
        "optim.rest.lr 0.001 -> 0.002",
        "checkpoint.resume_changed false -> true",
    ]


def test_many_changes_and_long_values_stay_one_short_line():
    overrides = [
        "optim.cnn.lr=2e-2",
        "seed=7",
        "optim.cnn.momentum=0.5",
        "optim.cnn.weight_decay=0.1",
        "optim.rest.weight_decay=0.1",
        "optim.rest.eps=1e-3",
        "optim.grad_clip=1",
        "objectives.mlm_weight=2",
        "objectives.mvm_weight=2",
        "objectives.itm_weight=2",
        "data.streams=[{remote: s3://bucket/" + "x" * 5000 + "}]",
    ]
    with pytest.raises(SpecError) as refused:
        resume_check.check(load_job(DEMO, overrides), {"spec": _saved()}, "ckpt")
    message = str(refused.value)
    assert "(and 6 more)" in message and len(message) < 1000


def test_a_checkpoint_without_a_saved_spec_resumes_with_a_warning(caplog):
    job = load_job(DEMO, ["optim.rest.lr=2e-3"])
    with caplog.at_level(logging.WARNING, logger="soho_scale.engine.resume_check"):
        assert resume_check.check(job, {"spec_hash": "0123456789abcdef"}, "old/step_1") == ()
    assert "old/step_1 records no spec" in caplog.text


@pytest.mark.slow
@pytest.mark.multiprocess
def test_train_refuses_a_changed_resume_and_records_allowed_ones(make_job, tmp_path):
    job = make_job("changed", schedule__steps=1)
    run_dir, ckpt = str(tmp_path / "run"), tmp_path / "changed-ckpt"
    first = run_train(job, run_dir, 1)
    assert first.returncode == 0, first.stderr[-4000:]
    assert _tags(ckpt) == ["step_00000001"]

    # (a) a changed learning rate: refused by the launcher, one line, exit 2, nothing trained.
    refused = run_train(job, run_dir, 1, "optim.rest.lr=2e-3")
    assert refused.returncode == 2
    line = (
        f"resume refused: spec changed since the checkpoint {ckpt}/step_00000001: "
        "optim.rest.lr 0.001 -> 0.002; set checkpoint.resume_changed=true to resume anyway"
    )
    assert refused.stderr.strip().splitlines() == [f"soho-scale train: {line}"]
    assert refused.stdout == ""  # no rank started
    # A cluster node starts its ranks without `soho-scale train`: the rank refuses as well,
    # before DeepSpeed loads anything, with the same line and no traceback.
    rank = subprocess.run(
        [sys.executable, "-m", "soho_scale.launch.rank", "train", job, "optim.rest.lr=2e-3"]
        + ["tracking.record_samples=true", "--run-dir", run_dir],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rank.returncode == 2, rank.stderr[-4000:]
    assert rank.stderr.strip().splitlines()[-1] == f"error: {line}"
    assert "Traceback" not in rank.stderr
    assert _tags(ckpt) == ["step_00000001"]
    assert [line["step"] for line in metrics_lines(run_dir)] == [1]

    store = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")

    # (b) a safe change (one more step, another logging interval): resumes, recorded.
    safe = run_train(job, run_dir, 1, "schedule.steps=2", "tracking.log_every=2")
    assert safe.returncode == 0, safe.stderr[-4000:]
    assert "step_00000002" in _tags(ckpt)
    assert metrics_lines(run_dir)[-1]["metrics"]["lr_rest"] == pytest.approx(1e-3)
    assert (
        "with a changed spec (safe to resume with): schedule.steps 1 -> 2, "
        "tracking.log_every 1 -> 2" in safe.stdout + safe.stderr
    )
    tags = store.get_run(_run_id(run_dir)).data.tags
    assert tags.get("resume_changed_keys") == "schedule.steps,tracking.log_every", safe.stderr

    # (c) the refused change with checkpoint.resume_changed=true: resumes, recorded.
    forced = run_train(
        job, run_dir, 1, "optim.rest.lr=2e-3", "schedule.steps=3", "checkpoint.resume_changed=true"
    )
    assert forced.returncode == 0, forced.stderr[-4000:]
    assert "step_00000003" in _tags(ckpt)
    assert "(checkpoint.resume_changed)" in forced.stdout + forced.stderr
    run = store.get_run(_run_id(run_dir))
    assert run.data.tags["resume_changed_keys"].split(",") == [
        "optim.rest.lr",
        "schedule.steps",
        "checkpoint.resume_changed",
        "tracking.log_every",
    ]
    assert "optim.rest.lr 0.001 -> 0.002" in run.data.tags["resume_changes"]
    assert run.info.status == "FINISHED"
    last = metrics_lines(run_dir)[-1]
    assert last["step"] == 3 and last["metrics"]["lr_rest"] == pytest.approx(2e-3)
