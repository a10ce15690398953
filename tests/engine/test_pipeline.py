"""Pipelines: stages hand checkpoints on, finished stages are skipped on a re-run, and MLflow
holds one parent run with a child run per stage."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.engine.conftest import REPO, kill_group, wait_for_steps

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
    # Each stage records the resolved spec it ran, which a re-run compares with its own.
    done = json.loads((root / "again" / "stage_done.json").read_text())
    assert done["step"] == 1 and done["spec"]["schedule"]["steps"] == 1

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


def _pipeline(tmp_path, stages: list[dict]) -> tuple[list[str], dict]:
    spec = {"name": "f", "experiment": "pipe-fail", "run_root": str(tmp_path / "pipe"),
            "stages": stages}  # fmt: skip
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return [sys.executable, "-m", "soho_scale.cli", "pipeline", str(path)], env


def test_a_bad_stage_spec_fails_before_anything_starts(make_job, tmp_path):
    job = make_job("spec", schedule__steps=1)
    command, env = _pipeline(tmp_path, [
        {"name": "a", "train": job, "nproc": 1},
        {"name": "b", "train": job, "nproc": 1, "overrides": ["optim.cnn.lr=fast"]},
    ])  # fmt: skip
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "soho-scale pipeline: stages.b: optim.cnn.lr: expected a number, got 'fast' "
        "(from override optim.cnn.lr=fast)"
    ]
    assert not (tmp_path / "pipe").exists()


def test_a_failed_stage_fails_the_pipeline_in_one_line_and_marks_its_run(make_job, tmp_path):
    job = make_job("fails", schedule__steps=1)
    missing = tmp_path / "nowhere" / "model.pt"
    command, env = _pipeline(tmp_path, [
        {"name": "a", "train": job, "nproc": 1, "overrides": [f"model.init_from={missing}"]},
    ])  # fmt: skip
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    # one line of ours (MLflow itself logs the creation of its store)
    (line,) = [x for x in result.stderr.splitlines() if "mlflow.store" not in x]
    assert line.startswith("soho-scale pipeline: stage a failed (exit ")
    assert f"model.init_from: {missing}: no such file or folder" in line
    assert line.endswith(f"see {tmp_path}/pipe/a/stage.log")
    client = MlflowClient(f"sqlite:///{tmp_path}/pipe/mlflow.db")
    (parent,) = client.search_runs([client.get_experiment_by_name("pipe-fail").experiment_id])
    assert parent.info.status == "FAILED"
    assert parent.data.tags["failure"] == line.removeprefix("soho-scale pipeline: ")


def test_pipeline_training_stages_across_the_hosts_of_a_hostfile(make_job, tmp_path):
    """`--hostfile`: training stages go through `soho-scale launch --hostfile`, the real DeepSpeed
    runner; pdsh and ssh are loopback stand-ins that run on this machine what they are given for
    the one host (pdsh replaces %n with the host's index), and the stage hands its weights on."""
    shims = tmp_path / "bin"
    shims.mkdir()
    tools = {
        "pdsh": 'while [ $# -gt 0 ]; do case "$1" in -S) shift;; -f|-w) shift 2;; *) break;; esac;'
        ' done\ncommand="$*"\nexec bash -c "${command//%n/0}"',
        "ssh": 'while [ "${1#-}" != "$1" ]; do shift 2; done\nshift\nexec "$@"',  # skip -o X, host
    }
    for name, body in tools.items():
        (shims / name).write_text(f"#!/bin/bash\n{body}\n")
        (shims / name).chmod(0o755)
    job = make_job("hoststage", schedule__steps=2)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 slots=1\n")
    command, env = _pipeline(tmp_path, [{"name": "pre", "train": job, "nproc": 1}])
    env = {**env, "PATH": f"{shims}:{env['PATH']}", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [*command, "--hostfile", str(hostfile)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    root = tmp_path / "pipe"
    log = (root / "pre" / "stage.log").read_text()
    assert result.returncode == 0, result.stderr[-3000:] + log[-3000:]
    assert f"soho_scale.cli launch {job}" in log and f"--hostfile {hostfile}" in log
    assert (root / "pre" / "export" / "model.pt").exists()


def test_a_stage_that_dies_at_run_time_fails_its_run_and_the_pipeline(make_job, tmp_path):
    """A training stage's rank is killed mid-run (SIGKILL: it cannot say so itself): the pipeline
    prints one line, exits 1, marks the stage's MLflow run and its own FAILED with that line, and
    starts no later stage."""
    import psutil

    job = make_job("dies", schedule__steps=500)
    command, env = _pipeline(tmp_path, [
        {"name": "a", "train": job, "nproc": 1},
        {"name": "b", "train": job, "nproc": 1, "init_from": "a"},
    ])  # fmt: skip
    root = tmp_path / "pipe"
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=err,
                                start_new_session=True)  # fmt: skip
    try:
        wait_for_steps(str(root / "a"), 1)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "soho_scale.launch.rank" in " ".join(p.cmdline())]  # fmt: skip
        assert ranks
        for rank in ranks:
            rank.kill()
        assert proc.wait(timeout=300) == 1
    finally:
        if proc.poll() is None:
            kill_group(proc)
    stderr = (tmp_path / "err.log").read_text()
    (line,) = [x for x in stderr.splitlines() if "mlflow.store" not in x]
    assert line.startswith("soho-scale pipeline: stage a failed (exit ")
    assert line.endswith(f"see {root}/a/stage.log")
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("pipe-fail").experiment_id])
    by_name = {r.data.tags["mlflow.runName"]: r for r in runs}
    assert sorted(by_name) == ["f-a", "pipeline-f"]  # stage b never started
    for run in by_name.values():
        assert run.info.status == "FAILED"
    assert by_name["f-a"].data.tags["failure"] == line.removeprefix("soho-scale pipeline: ")
    assert by_name["pipeline-f"].data.tags["failure"] == line.removeprefix("soho-scale pipeline: ")
    assert not (root / "b").exists()
