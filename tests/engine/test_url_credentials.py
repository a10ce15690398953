"""`soho-scale train` with credentials inside the MLflow and S3 URLs: tracking still reaches the
server (basic auth from the URI), and the probe values appear in no output, no file of the run
and no MLflow param, tag, dataset input or artifact."""

from __future__ import annotations

import glob
import json
import os
import tempfile

import pytest
from mlflow.tracking import MlflowClient

from tests.engine.conftest import metrics_lines, run_train

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

MLFLOW_USER, MLFLOW_PASSWORD = "probeuser", "probe-secret-XYZ41"
S3_USER, S3_PASSWORD = "s3probeuser", "s3-probe-secret-QQ72"
PROBES = (MLFLOW_USER, MLFLOW_PASSWORD, S3_USER, S3_PASSWORD)


def _leaks(data: bytes) -> list[str]:
    return [p for p in PROBES if p.encode() in data]


def test_train_with_credentials_in_urls_tracks_and_leaks_nothing(
    make_job, tmp_path, mlflow_server, s3
):
    with_user = lambda url, user, pw: url.replace("http://", f"http://{user}:{pw}@")  # noqa: E731
    env = {
        "MLFLOW_TRACKING_URI": with_user(mlflow_server, MLFLOW_USER, MLFLOW_PASSWORD),
        "S3_ENDPOINT_URL": with_user(s3.endpoint_url, S3_USER, S3_PASSWORD),
    }
    job = make_job("creds", schedule__steps=2)
    run_dir = str(tmp_path / "run")
    result = run_train(job, run_dir, 1, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert _leaks((result.stdout + result.stderr).encode()) == []

    # Tracking reached the server through the URI's user:password: the run and its 2 steps.
    assert [line["step"] for line in metrics_lines(run_dir)] == [1, 2]
    with open(os.path.join(run_dir, "tracking.json")) as f:
        info = json.load(f)
    client = MlflowClient(mlflow_server)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]

    # Every file the run wrote (run folder, checkpoints) ...
    written = [tmp_path / "run", tmp_path / "creds-ckpt"]
    for path in (p for folder in written for p in glob.glob(f"{folder}/**/*", recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                assert _leaks(f.read()) == [], path
    # ... and everything MLflow holds of the run.
    recorded = [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(info)]
    recorded += [d.dataset.source for d in run.inputs.dataset_inputs]
    recorded.append(run.info.artifact_uri)
    assert _leaks("\n".join(recorded).encode()) == []
    assert {"resolved_spec.yaml", "summary.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        client.download_artifacts(run.info.run_id, "", folder)
        for path in glob.glob(f"{folder}/**/*", recursive=True):
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    assert _leaks(f.read()) == [], path
