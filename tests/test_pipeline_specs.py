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


def test_an_override_set_reruns_a_pipeline_file_in_other_conditions(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    paper = "jobs/pipelines/soho_r101_l12.yaml"
    pipeline = load_pipeline(paper, "jobs/pipelines/override_sets/rehearsal_cpu.yaml")
    assert (pipeline.run_root, pipeline.experiment) == ("runs/rehearsal_cpu", "soho-rehearsal-cpu")
    assert {stage.nproc for stage in pipeline.stages} == {1}
    by_name = {stage.name: stage for stage in pipeline.stages}
    nlvr2_test = by_name["nlvr2-test"].overrides
    assert nlvr2_test[0] == "model.preset=tiny"  # the set's overrides first, the stage's after
    assert nlvr2_test[-2:] == [
        "eval.streams.0.remote=s3://soho-data/nlvr2/test1",
        "eval.split=test1",
    ]
    assert by_name["retrieval_coco-eval"].overrides[-1] == "eval.retrieval_folds=5"
    assert "eval.retrieval_folds=5" not in by_name["retrieval_f30k-eval"].overrides
    for stage in pipeline.stages:
        job = load_job(stage.train or stage.eval, list(stage.overrides))
        assert job.model.preset == "tiny" and job.schedule.steps == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage_overrides: {nope: [seed=1]}\n")
    with pytest.raises(ValueError, match="stage_overrides: no stage 'nope'"):
        load_pipeline(paper, str(bad))
