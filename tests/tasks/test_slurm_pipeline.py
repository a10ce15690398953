"""`soho-scale pipeline SPEC --scheduler slurm` on a real Slurm (tests/slurm_cluster.py): the demo
pipeline's VQA branch shrunk to a few steps, every stage a Slurm job with the resources its job
declares, the evaluation after the fine-tune (afterok), the report after both; submitting again
skips the finished stages."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from soho_scale.pipeline_cli import pipeline_main
from tests.tasks.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_pipeline_stages_run_as_dependent_slurm_jobs(
    slurm, task_shards, tmp_path, monkeypatch, capsys
):
    train, evaluate = task_shards["vqa"]
    (tmp_path / "jobs").mkdir()
    shutil.copy(REPO / "jobs" / "demo" / "vqa.yaml", tmp_path / "jobs" / "vqa.yaml")
    overrides = [
        f"data.streams.0.remote={train}",
        f"eval.streams.0.remote={evaluate}",
        "model.init_from=null",
        "data.workers=0",
        "data.image.min_size=48",
        "data.image.max_size=64",
        "batch.global_batch=16",
        "batch.micro_batch_per_rank=8",
        "resources.procs_per_node=1",
        "schedule.epochs=null",
        "schedule.steps=2",
        "schedule.warmup_steps=1",
        "schedule.decay_steps=[]",
        "schedule.decay_epochs=[]",
        "checkpoint.interval_steps=2",
    ]
    root = tmp_path / "pipe"
    spec = {
        "name": "slurmdemo",
        "experiment": "slurm-pipeline",
        "run_root": str(root),
        "stages": [
            {"name": "vqa", "train": "jobs/vqa.yaml", "nproc": 1, "overrides": overrides},
            {"name": "vqa-eval", "eval": "jobs/vqa.yaml", "checkpoint": "vqa", "nproc": 1,
             "overrides": overrides},
        ],
    }  # fmt: skip
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = ["pipeline.yaml", "--scheduler", "slurm", "--cpu", "--workdir", str(tmp_path)]
    argv += ["--setup", f"source {shlex.quote(sys.prefix)}/bin/activate"]
    assert pipeline_main(argv) == 0
    out = capsys.readouterr().out
    ids = {name: (root / name / "slurm_job").read_text().strip() for name in ("vqa", "vqa-eval")}
    report = (root / "report" / "slurm_job").read_text().strip()
    assert f"vqa-eval: Slurm job {ids['vqa-eval']}, after {ids['vqa']}" in out
    assert f"report: Slurm job {report}, after {ids['vqa']}, {ids['vqa-eval']}" in out
    # The fine-tune asks for what its job declares: 1 rank x (0 loader workers + 1) cores.
    assert "#SBATCH --cpus-per-task=1" in (root / "vqa" / "stage.sbatch").read_text()
    assert slurm.job(ids["vqa-eval"])["Dependency"].startswith(f"afterok:{ids['vqa']}")

    info = slurm.wait_job(report, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600)
    logs = "".join(
        (root / name / log).read_text()
        for name, log in (("vqa", "stage.log"), ("report", "stage.log"))
        if (root / name / log).exists()
    )
    assert info["JobState"] == "COMPLETED", logs[-4000:] + slurm.logs()
    assert json.loads((root / "vqa" / "stage_done.json").read_text())["step"] == 2
    assert (root / "vqa" / "export" / "model.pt").exists()
    metrics = json.loads((root / "vqa-eval" / "stage_done.json").read_text())["metrics"]
    assert 0 <= metrics["vqa_accuracy"] <= 100 and metrics["num_samples"] == 48
    assert (root / "report" / "results.md").exists()
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("slurm-pipeline").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("mlflow.runName") == "pipeline-slurmdemo"]
    assert parent.info.status == "FINISHED"
    (train,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert train.data.tags["mlflow.runName"] == "slurmdemo-vqa"
    # The evaluation is the child of the run whose weights it scores.
    (scored,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == train.info.run_id]
    assert {train.info.status, scored.info.status} == {"FINISHED"}

    assert pipeline_main(argv) == 0  # again: nothing left but the report
    out = capsys.readouterr().out
    assert "vqa: done already, skipped" in out and "vqa-eval: done already, skipped" in out


def test_a_failed_stage_cancels_the_stages_after_it(slurm, tmp_path, monkeypatch, capsys):
    """The fine-tune cannot read its shards: its job fails, its run and the pipeline's are marked
    FAILED with the reason, and the evaluation and report waiting on it are cancelled."""
    (tmp_path / "jobs").mkdir()
    shutil.copy(REPO / "jobs" / "demo" / "vqa.yaml", tmp_path / "jobs" / "vqa.yaml")
    overrides = [f"data.streams.0.remote={tmp_path / 'missing'}", "model.init_from=null"]
    root = tmp_path / "pipe"
    spec = {
        "name": "slurmfail",
        "experiment": "slurm-pipeline-fail",
        "run_root": str(root),
        "stages": [
            {"name": "vqa", "train": "jobs/vqa.yaml", "nproc": 1, "overrides": overrides},
            {"name": "vqa-eval", "eval": "jobs/vqa.yaml", "checkpoint": "vqa", "nproc": 1,
             "overrides": overrides},
        ],
    }  # fmt: skip
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = ["pipeline.yaml", "--scheduler", "slurm", "--cpu", "--workdir", str(tmp_path)]
    argv += ["--setup", f"source {shlex.quote(sys.prefix)}/bin/activate"]
    assert pipeline_main(argv) == 0
    capsys.readouterr()
    ids = {n: (root / n / "slurm_job").read_text().strip() for n in ("vqa", "vqa-eval", "report")}
    info = slurm.wait_job(ids["vqa"], {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
    log = (root / "vqa" / "stage.log").read_text()
    assert info["JobState"] == "FAILED", log[-3000:]
    assert re.search(r"soho-scale pipeline: stage vqa failed \(exit \d+\)", log)
    for later in ("vqa-eval", "report"):
        assert (
            slurm.wait_job(ids[later], {"CANCELLED", "COMPLETED", "FAILED"}, 120)["JobState"]
            == "CANCELLED"
        )
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("slurm-pipeline-fail").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("mlflow.runName") == "pipeline-slurmfail"]
    assert parent.info.status == "FAILED"
    assert "stage vqa failed" in parent.data.tags["failure"]
    assert not (root / "vqa" / "stage_done.json").exists()
