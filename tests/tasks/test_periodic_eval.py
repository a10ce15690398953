"""A fine-tune that evaluates its val split while it trains (`eval.every_steps`): real DeepSpeed
on one CPU rank (`soho-scale train`), a real MLflow sqlite store, the synthetic world's shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from soho_scale.engine import checkpoint_store as store
from tests.tasks.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _train(task_shards, run_dir: str, *overrides: str) -> None:
    train, dev = task_shards["snli_ve"]
    command = [
        sys.executable, "-m", "soho_scale.cli", "train", "jobs/demo/snli_ve.yaml",
        f"data.streams.0.remote={train}", f"eval.streams.0.remote={dev}",
        "model.init_from=null", "model.overrides.dropout=0.1",  # training draws from the RNG
        "data.workers=0", "data.image.min_size=48",
        "data.image.max_size=64", "batch.micro_batch_per_rank=8", "batch.global_batch=8",
        "schedule.steps=6", "schedule.warmup_steps=1", "schedule.decay_steps=[]",
        f"checkpoint.dir={run_dir}/checkpoints", "checkpoint.interval_steps=100",
        "checkpoint.keep_last=1", "tracking.log_every=1", "tracking.record_samples=true",
        "resources.procs_per_node=1", *overrides, "--nproc", "1", "--run-dir", run_dir,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _history(run_dir: str, name: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    with open(os.path.join(run_dir, "tracking.json")) as f:
        run_id = json.load(f)["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    for _ in range(50):  # the run's end is written by its tracker thread before exit
        if client.get_run(run_id).info.status == "FINISHED":
            break
        time.sleep(0.1)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))


def _losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "record_rank0_from0.json")) as f:
        return json.load(f)["losses"]


def test_val_every_two_steps_keeps_the_best_checkpoint_and_the_pipeline_exports_it(
    task_shards, tmp_path
):
    from soho_scale.engine.weights import read_weights
    from soho_scale.pipeline import Pipeline, export_path, finish_stage

    root = tmp_path / "pipe"
    run_dir = str(root / "finetune")
    _train(task_shards, run_dir, "eval.every_steps=2")

    curve = _history(run_dir, "dev_accuracy")
    assert [step for step, _ in curve] == [2, 4, 6]
    best = store.read_best(f"{run_dir}/checkpoints")
    top = max(value for _, value in curve)
    assert best["step"] == next(step for step, value in curve if value == top)  # the first
    assert (best["metric"], best["value"]) == ("accuracy", top)
    # keep_last=1 keeps the newest and the best, nothing else
    kept = [c.step for c in store.committed_checkpoints(f"{run_dir}/checkpoints")]
    assert kept == sorted({best["step"], 6})

    pipe = Pipeline(
        name="p",
        experiment="e",
        run_root=str(root),
        stages=[{"name": "finetune", "train": "jobs/demo/snli_ve.yaml"}],
    )
    result = finish_stage(pipe, pipe.stages[0], 0, time.time())
    assert (result["best_step"], result["best_value"]) == (best["step"], top)
    assert read_weights(export_path(str(root), "finetune"))[1]["step"] == best["step"]

    # The evaluations drew nothing from the training RNG streams: same batches, same losses.
    plain = str(tmp_path / "plain")
    _train(task_shards, plain)
    assert _losses(run_dir) == _losses(plain)
    assert _history(plain, "dev_accuracy") == []


def test_pretraining_probes_zero_shot_retrieval_while_it_trains(task_shards, tmp_path):
    """A probe every 2 steps over 4: its evaluations run in the background (training goes on:
    step 4's checkpoint comes while step 2's probe runs, and waits for it), and the curve lands
    in the pre-training run at the checkpoints' steps, though keep_last pruned step 2."""
    train, test = task_shards["retrieval"]
    run_dir = str(tmp_path / "pretrain")
    probe = {
        "name": "zs_retrieval",
        "job": "jobs/demo/retrieval.yaml",
        "every_steps": 2,
        "overrides": [
            f"eval.streams.0.remote={test}",
            "model.init_from=null",
            "data.workers=0",
            "data.image.min_size=48",
            "data.image.max_size=64",
            "eval.retrieval_modes=[two_stage]",
            "eval.retrieval_k=4",
        ],  # fmt: skip
    }
    command = [
        sys.executable, "-m", "soho_scale.cli", "train", "jobs/demo/pretrain.yaml",
        f"data.streams=[{{remote: {train}}}]", "data.workers=0", "data.image.min_size=48",
        "data.image.max_size=64", "batch.micro_batch_per_rank=8", "batch.global_batch=8",
        "schedule.steps=4", "schedule.warmup_steps=1", "schedule.decay_steps=[]",
        f"checkpoint.dir={run_dir}/checkpoints", "checkpoint.interval_steps=2",
        "checkpoint.keep_last=1", "tracking.log_every=1", "resources.procs_per_node=1",
        f"eval.probes=[{json.dumps(probe)}]", "--nproc", "1", "--run-dir", run_dir,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout[-3000:] + result.stderr[-5000:]
    assert result.returncode == 0, log

    curve = _history(run_dir, "probe.zs_retrieval.two_stage_rsum")
    assert [step for step, _ in curve] == [2, 4], log
    assert all(0 <= value <= 600 for _, value in curve)
    assert "probe zs_retrieval: step 4 waits, the evaluation of step 2 still runs" in log
    for step in (2, 4):
        folder = os.path.join(run_dir, "probes", "zs_retrieval", f"step_{step:08d}")
        with open(os.path.join(folder, "metrics.json")) as f:
            assert json.load(f)["checkpoint_step"] == step
        assert not os.path.exists(os.path.join(folder, "model.pt"))  # removed once logged
    assert [c.step for c in store.committed_checkpoints(f"{run_dir}/checkpoints")] == [4]
    assert os.path.isdir(os.path.join(run_dir, "probes", "zs_retrieval", "shard_cache"))
