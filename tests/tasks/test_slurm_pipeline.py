"""`soho-scale pipeline SPEC --scheduler slurm` on a real Slurm (tests/slurm_cluster.py): the demo
pipeline (jobs/pipelines/demo.yaml) shrunk by its smoke override set, every stage a Slurm job with
the resources its job declares, each after the stages it reads (afterok), the report after all;
submitting again skips the finished stages. A failed stage cancels the jobs waiting on it."""

from __future__ import annotations

import re
import shlex
import shutil
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from data_pipeline.loopback import LocalS3Server
from data_pipeline.synthetic import convert_world
from soho_scale.pipeline import load_pipeline
from soho_scale.pipeline_cli import pipeline_main
from tests.tasks.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

PIPELINE = "jobs/pipelines/demo.yaml"
SMOKE = "jobs/pipelines/override_sets/demo_smoke.yaml"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


@pytest.fixture
def demo_shards(world):
    """The demo's shards (s3://soho-demo/...) from the synthetic world, on a local S3 server the
    Slurm jobs reach through the S3_ENDPOINT_URL their scripts export."""
    with LocalS3Server(buckets=["soho-demo"]) as server:
        convert_world(str(world), "s3://soho-demo")
        yield server


def _submit(slurm, argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = [*argv, "--scheduler", "slurm", "--cpu"]
    argv += ["--setup", f"source {shlex.quote(sys.prefix)}/bin/activate"]
    capsys.readouterr()
    assert pipeline_main(argv) == 0
    return capsys.readouterr().out


def test_the_demo_pipeline_runs_as_dependent_slurm_jobs(
    slurm, demo_shards, tmp_path, monkeypatch, capsys
):
    root = tmp_path / "pipe"
    monkeypatch.chdir(REPO)
    argv = [PIPELINE, "--override-set", SMOKE, "--run-root", str(root)]
    out = _submit(slurm, argv, monkeypatch, capsys)
    stages = load_pipeline(PIPELINE).stages
    ids = {s.name: (root / s.name / "slurm_job").read_text().strip() for s in stages}
    report = (root / "report" / "slurm_job").read_text().strip()
    for stage in stages:  # each stage after the stage it reads
        before = stage.init_from or stage.checkpoint
        expected = f"{stage.name}: Slurm job {ids[stage.name]}"
        assert expected + (f", after {ids[before]}" if before else "") + "\n" in out
    assert f"report: Slurm job {report}, after {', '.join(ids.values())}" in out
    # The job's resources: 1 rank x (0 loader workers + 1) cores.
    assert "#SBATCH --cpus-per-task=1" in (root / "pretrain" / "stage.sbatch").read_text()
    assert slurm.job(ids["vqa-eval"])["Dependency"].startswith(f"afterok:{ids['vqa']}")

    info = slurm.wait_job(report, ENDED, 1200)
    failed = [n for n in ids if slurm.job(ids[n])["JobState"] != "COMPLETED"]
    logs = "".join((root / n / "stage.log").read_text()[-3000:] for n in failed)
    assert info["JobState"] == "COMPLETED" and not failed, f"{failed}: {logs}{slurm.logs()}"
    assert all((root / s.name / "stage_done.json").exists() for s in stages)
    results = (root / "report" / "results.md").read_text()
    for task in ("vqa", "nlvr2", "retrieval", "snli_ve"):
        assert f"| {task} |" in results
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("soho-demo-smoke").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("mlflow.runName") == "pipeline-demo"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 5  # the training stages; each evaluation is its training's child

    out = _submit(slurm, argv, monkeypatch, capsys)  # again: nothing left but the report
    for stage in stages:
        assert f"{stage.name}: done already, skipped" in out


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
    _submit(slurm, ["pipeline.yaml", "--workdir", str(tmp_path)], monkeypatch, capsys)
    ids = {n: (root / n / "slurm_job").read_text().strip() for n in ("vqa", "vqa-eval", "report")}
    info = slurm.wait_job(ids["vqa"], ENDED, 300)
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
