"""The shipped pipeline specs parse, and every stage's job spec loads."""

from pathlib import Path

import pytest

from soho_scale.pipeline import load_pipeline
from soho_scale.spec import load_job

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "pipelines").glob("*.yaml")), ids=str)
def test_pipeline_spec_and_its_jobs_load(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    pipeline = load_pipeline(str(path))
    for stage in pipeline.stages:
        load_job(stage.train or stage.eval, list(stage.overrides))


def test_pipeline_spec_errors_name_the_stage(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nexperiment: e\nrun_root: r\nstages:\n"
        "  - {name: ft, train: jobs/demo/vqa.yaml, init_from: missing}\n"
    )
    with pytest.raises(ValueError, match="'missing' is not an earlier training stage"):
        load_pipeline(str(bad))
