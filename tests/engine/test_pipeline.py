"""Pipelines: stages hand checkpoints on, finished stages are skipped on a re-run, and MLflow
holds one parent run with a child run per stage."""

import os
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.engine.conftest import REPO

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_pipeline_hands_on_weights_and_skips_finished_stages(make_job, tmp_path):
    job = make_job("stage", schedule__steps=2)
    root = tmp_path / "pipe"
    spec = {
        "name": "t",
        "experiment": "pipe-test",
        "run_root": str(root),
        "stages": [
            {"name": "pre", "train": job, "nproc": 1},
            {
                "name": "again",
                "train": job,
                "nproc": 1,
                "init_from": "pre",
                "overrides": ["schedule.steps=1"],
            },
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, "-m", "soho_scale.cli", "pipeline", str(path)]
    first = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (root / "pre" / "export" / "model.pt").exists()
    log = (root / "again" / "stage.log").read_text()
    assert f"model.init_from={root}/pre/export/model.pt" in log
    assert "loaded" in log  # the transfer report of the hand-off

    second = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[1/2] pre: done already, skipped" in second.stdout
    assert "[2/2] again: done already, skipped" in second.stdout

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("pipe-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mlflow.runName") == "pipeline-t"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == ["t-again", "t-pre"]
