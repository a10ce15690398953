"""The trainer end to end: real DeepSpeed over gloo (2 CPU ranks), shards on a loopback S3 server,
MLflow (a real server, and a dead one), checkpoints with commit markers, resume and preemption."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from soho_scale.engine.weights import consolidated_state_dict
from tests.engine.conftest import (
    REPO,
    SECRET,
    kill_group,
    metrics_lines,
    record,
    run_train,
    start_train,
    wait_for,
    wait_for_steps,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

CNN_PARAM = "soho.vision.stages.3.0.conv2.weight"  # SGD group
REST_PARAM = "soho.fusion.pre_norm.layers.1.linear2.weight"  # AdamW group


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def _both_groups_changed(before: str, after: str) -> None:
    a, _ = consolidated_state_dict(before)
    b, _ = consolidated_state_dict(after)
    assert not torch.equal(a[CNN_PARAM], b[CNN_PARAM]), "SGD group (CNN) did not change"
    assert not torch.equal(a[REST_PARAM], b[REST_PARAM]), "AdamW group did not change"


def _falls(values: list[float]) -> bool:
    return sum(values[-2:]) / 2 < sum(values[:2]) / 2


def test_zero2_trains_logs_and_resumes_exactly_after_sigkill(make_job, tmp_path, mlflow_server):
    job = make_job("zero2")
    run_a = str(tmp_path / "run-a")
    # MLflow's own knob: its system metrics every second (10 s by default, longer than this run)
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    result = run_train(job, run_a, 2, env=env)
    _ok(result)
    ckpt_a = str(tmp_path / "zero2-ckpt")
    assert sorted(os.listdir(ckpt_a))[:3] == ["step_00000002", "step_00000004", "step_00000006"]

    # Loss falls (MLM, the steadiest of the three) and both optimizer groups move.
    lines = metrics_lines(run_a)
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert _falls([line["metrics"]["mlm_loss"] for line in lines])
    _both_groups_changed(f"{ckpt_a}/step_00000002", f"{ckpt_a}/step_00000006")

    # MLflow (a real server): params, metrics, artifacts; the planted secret appears nowhere.
    client = MlflowClient(mlflow_server)
    with open(os.path.join(run_a, "tracking.json")) as f:
        run = client.get_run(json.load(f)["run_id"])
    params, metrics = run.data.params, run.data.metrics
    for key in (
        "optim.cnn.lr",
        "optim.rest.lr",
        "deepspeed.zero_stage",
        "derived.accumulation_steps",
        "git_sha",
        "version.deepspeed",
        "data.stream0.url",
        "data.stream0.index_sha256",
        "data.stream0.samples",
        "overrides",
    ):
        assert key in params, key
    assert params["data.stream0.samples"] == "48"
    # Which library patches ran (data_pipeline/patches, soho_scale/engine/patches).
    assert params["patch.streaming_shard_state"] == "on"
    assert params["patch.deepspeed_shm_comm"] == "on"
    assert params["patch.deepspeed_zero3"] == "not used"  # a ZeRO-2 job
    for key in (
        "loss",
        "mlm_loss",
        "mvm_loss",
        "itm_loss",
        "mlm_acc",
        "itm_acc",
        "lr_cnn",
        "lr_rest",
        "grad_norm",
        "samples_per_s",
        "tokens_per_s",
        "data_wait_fraction",
        "peak_memory_gb",
        "vd_perplexity",
        "vd_used",
        "skipped_samples",
        *(f"phase_{p}_ms" for p in ("backbone", "neck_vd", "transformer", "heads", "forward")),
        *(f"phase_{p}_ms" for p in ("forward_other", "backward", "optimizer")),
    ):
        assert key in metrics, key
    assert any(key.startswith("system/cpu_utilization") for key in metrics)  # MLflow's sampler
    (train_input,) = run.inputs.dataset_inputs  # the stream as an MLflow dataset
    assert train_input.dataset.digest == params["data.stream0.index_sha256"][:16]
    assert json.loads(train_input.dataset.source)["uri"] == params["data.stream0.url"]
    assert {t.key: t.value for t in train_input.tags}["mlflow.data.context"] == "train"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"resolved_spec.yaml", "summary.json"} <= artifacts
    assert run.info.status == "FINISHED"
    assert all(SECRET not in str(v) for v in params.values())
    assert SECRET not in result.stdout + result.stderr
    for path in glob.glob(f"{run_a}/**/*", recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                assert SECRET.encode() not in f.read(), path

    # Killed (SIGKILL, whole process group) after its step-2 checkpoint, then relaunched: the
    # resumed steps see the same samples and give the same losses as the uninterrupted run.
    job_b = make_job("killed")
    run_b = str(tmp_path / "run-b")
    ckpt_b = tmp_path / "killed-ckpt"
    proc = start_train(job_b, run_b, 2, "schedule.steps=1000")
    try:
        wait_for(lambda: (ckpt_b / "step_00000002" / "manifest.json").exists(), 300, "checkpoint")
    finally:
        kill_group(proc)
    _ok(run_train(job_b, run_b, 2))
    # One job, one MLflow run: the relaunch reopens the run the checkpoint names.
    with open(ckpt_b / "step_00000002" / "manifest.json") as f:
        first_run = json.load(f)["mlflow_run_id"]
    with open(os.path.join(run_b, "tracking.json")) as f:
        assert json.load(f)["run_id"] == first_run
    store_b = MlflowClient(f"sqlite:///{run_b}/mlflow.db")
    (only,) = store_b.search_runs([e.experiment_id for e in store_b.search_experiments()])
    assert only.info.run_id == first_run and only.info.status == "FINISHED"
    assert "optim.cnn.lr" in only.data.params
    # its artifacts stay in the run folder (MLflow's default is ./mlruns of the current folder)
    assert only.info.artifact_uri.startswith(f"file://{run_b}/mlartifacts/")
    assert "resolved_spec.yaml" in {a.path for a in store_b.list_artifacts(first_run)}
    assert {1, 2, 5, 6} <= {m.step for m in store_b.get_metric_history(first_run, "loss")}
    for rank in (0, 1):
        full, resumed = record(run_a, rank, 0), record(run_b, rank, 2)
        per_step = len(full["samples"]) // 6
        assert resumed["samples"] == full["samples"][2 * per_step :]
        torch.testing.assert_close(resumed["losses"], full["losses"][2:], rtol=1e-6, atol=1e-6)

    # Elastic: the 2-rank step-2 checkpoint resumes on 1 rank (universal checkpoint) and finishes
    # the epoch: every sample of the epoch is seen exactly once.
    elastic_ckpt = tmp_path / "elastic-ckpt"
    shutil.copytree(f"{ckpt_a}/step_00000002", elastic_ckpt / "step_00000002")
    job_c = make_job("elastic", checkpoint__dir=str(elastic_ckpt))
    run_c = str(tmp_path / "run-c")
    _ok(run_train(job_c, run_c, 1, "schedule.steps=3"))
    before = [s for rank in (0, 1) for s in record(run_a, rank, 0)["samples"][: 2 * per_step]]
    after = record(run_c, 0, 2)["samples"]
    assert sorted(before + after) == list(range(48))
    # The checkpoint's run lives in another store (run-a's server): a new run, with its params.
    with open(os.path.join(run_c, "tracking.json")) as f:
        run_c_id = json.load(f)["run_id"]
    assert run_c_id != run.info.run_id
    params_c = MlflowClient(f"sqlite:///{run_c}/mlflow.db").get_run(run_c_id).data.params
    assert "optim.cnn.lr" in params_c


def test_zero3_with_mlflow_down_keeps_metrics_and_syncs_later(make_job, tmp_path, mlflow_server):
    from data_pipeline.loopback import free_port

    job = make_job("zero3", deepspeed__zero_stage=3, schedule__steps=4)
    run_dir = str(tmp_path / "run")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_train(job, run_dir, 2, env={"MLFLOW_TRACKING_URI": dead})
    _ok(result)
    output = result.stdout + result.stderr
    assert output.count("MLflow at") == 1 and "unreachable" in output  # one warning
    lines = metrics_lines(run_dir)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert _falls([line["metrics"]["mlm_loss"] for line in lines])
    ckpt = str(tmp_path / "zero3-ckpt")
    _both_groups_changed(f"{ckpt}/step_00000002", f"{ckpt}/step_00000004")

    # Resumed from its step-2 checkpoint (the optimizer's fp32 partitions are the weights
    # themselves under ZeRO-3, engine/patches/deepspeed_zero3.py): steps 3-4 give the same losses.
    resumed_ckpt = tmp_path / "zero3-resumed-ckpt"
    shutil.copytree(f"{ckpt}/step_00000002", resumed_ckpt / "step_00000002")
    resumed = make_job("zero3-resumed", deepspeed__zero_stage=3, schedule__steps=4,
                       checkpoint__dir=str(resumed_ckpt))  # fmt: skip
    resumed_dir = str(tmp_path / "run-resumed")
    _ok(run_train(resumed, resumed_dir, 2, env={"MLFLOW_TRACKING_URI": dead}))
    for rank in (0, 1):
        full, after = record(run_dir, rank, 0), record(resumed_dir, rank, 2)
        torch.testing.assert_close(after["losses"], full["losses"][2:], rtol=1e-6, atol=1e-6)

    # MLflow back: `soho-scale sync-tracking` uploads what was kept.
    sync = subprocess.run(
        [sys.executable, "-m", "soho_scale.cli", "sync-tracking", run_dir],
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert sync.returncode == 0, sync.stderr[-3000:]
    with open(os.path.join(run_dir, "tracking.json")) as f:
        run_id = json.load(f)["run_id"]
    history = MlflowClient(mlflow_server).get_metric_history(run_id, "mlm_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]


def test_sigterm_saves_to_s3_and_partial_checkpoints_are_ignored(make_job, tmp_path, s3):
    from data_pipeline.storage import s3_client

    job = make_job(
        "preempt", checkpoint__dir="s3://soho-test/ckpt-preempt", checkpoint__interval_steps=1000
    )
    run_dir = str(tmp_path / "run")
    proc = start_train(job, run_dir, 2, "schedule.steps=1000")
    try:
        wait_for_steps(run_dir, 2)
        proc.send_signal(signal.SIGTERM)  # what a scheduler or Ctrl-C does to `soho-scale train`
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert code == 75, open(run_dir + ".log").read()[-4000:]
    client = s3_client()
    keys = [
        o["Key"]
        for o in client.list_objects_v2(Bucket="soho-test", Prefix="ckpt-preempt/").get(
            "Contents", []
        )
    ]
    manifests = [k for k in keys if k.endswith("manifest.json")]
    assert len(manifests) == 1
    saved_step = int(manifests[0].split("/")[1].removeprefix("step_"))
    assert saved_step >= 2

    # A half-written newer checkpoint (no manifest) must be ignored, with a warning.
    client.put_object(
        Bucket="soho-test",
        Key="ckpt-preempt/step_00009999/mp_rank_00_model_states.pt",
        Body=b"partial",
    )
    result = run_train(job, run_dir, 2, f"schedule.steps={saved_step + 1}")
    _ok(result)
    output = result.stdout + result.stderr
    assert "ignoring partial checkpoint s3://soho-test/ckpt-preempt/step_00009999" in output
    assert f"at step {saved_step}" in output


def test_bad_spec_exits_2_naming_the_key(make_job):
    job = make_job("bad")
    result = subprocess.run(
        [sys.executable, "-m", "soho_scale.cli", "train", job, "optim.cnn.lr=fast"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.cnn.lr" in lines[0] and "fast" in lines[0]


def test_a_model_without_a_dictionary_pretrains_under_zero2(make_job, tmp_path):
    """vd_fusion none (the sweep's no_vd variant): 2 ranks under ZeRO-2 train MLM + ITM, the CNN
    and the transformer both move, and no MVM or dictionary metric is logged."""
    job = make_job("no_vd", schedule__steps=2, checkpoint__interval_steps=1)
    run_dir = str(tmp_path / "no_vd")
    no_vd = ["model.overrides.vd_fusion=none", "objectives.mvm_weight=0"]
    _ok(run_train(job, run_dir, 2, *no_vd))
    lines = metrics_lines(run_dir)
    assert [line["step"] for line in lines] == [1, 2]
    logged = [line["metrics"] for line in lines]
    assert all(m["loss"] == m["loss"] and m["itm_loss"] == m["itm_loss"] for m in logged)  # no NaN
    assert not any(key.startswith(("mvm_", "vd_")) for m in logged for key in m)
    checkpoints = sorted(glob.glob(str(tmp_path / "no_vd-ckpt" / "step_*")))
    _both_groups_changed(checkpoints[0], checkpoints[-1])
    weights, _ = consolidated_state_dict(checkpoints[-1])
    assert not any("dictionary" in key or "mvm_head" in key for key in weights)
