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


def test_unquoted_numbers_in_a_pipelines_text_fields_keep_their_text(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(
        "name: 2024.10\nexperiment: 010\nrun_root: 1.50\nstages:\n"
        "  - {name: 1_0, train: jobs/demo/pretrain.yaml, nproc: 0x2}\n"
    )
    pipe = load_pipeline(str(spec))
    assert (pipe.name, pipe.experiment, pipe.run_root) == ("2024.10", "010", "1.50")
    assert (pipe.stages[0].name, pipe.stages[0].nproc) == ("1_0", 2)


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


def test_the_pipelines_own_settings_read_back_as_written(tmp_path, monkeypatch):
    """The run root, experiment and stage names the pipeline hands each stage as overrides are
    quoted: a folder with " #" or ": " in it, or an experiment named 010 (YAML's octal 8),
    reach the job as they are."""
    from soho_scale.pipeline import eval_overrides, stage_job, train_overrides

    monkeypatch.chdir(ROOT)
    root = tmp_path / "runs #2: a"
    spec = tmp_path / "p.yaml"
    spec.write_text(
        f"name: x\nexperiment: '010'\nrun_root: '{root}'\nstages:\n"
        "  - {name: pre, train: jobs/demo/pretrain.yaml}\n"
        "  - {name: ft, train: jobs/demo/vqa.yaml, init_from: pre}\n"
        "  - {name: ev, eval: jobs/demo/vqa.yaml, checkpoint: ft}\n"
    )
    pipe = load_pipeline(str(spec))
    pre, ft, ev = pipe.stages
    job = load_job(ft.train, train_overrides(pipe, ft))
    assert job.checkpoint.dir == str(root / "ft" / "checkpoints")
    assert job.model.init_from == str(root / "pre" / "export" / "model.pt")
    assert (job.tracking.experiment, job.tracking.run_name) == ("010", "x-ft")
    assert load_job(ev.eval, eval_overrides(pipe, ev)).tracking.experiment == "010"
    # a stage may move its checkpoints (e.g. to s3:// for several nodes): finish_stage exports
    # from the stage's own checkpoint.dir, and a stage that committed none is one line
    from soho_scale.engine import checkpoint_store, weights
    from soho_scale.pipeline import StageFailed, finish_stage

    elsewhere = str(tmp_path / "elsewhere")
    moved = pre.model_copy(update={"overrides": [f"checkpoint.dir={elsewhere}"]})
    assert stage_job(pipe, moved).checkpoint.dir == elsewhere
    with pytest.raises(StageFailed, match=f"stage pre: no committed checkpoint in {elsewhere}"):
        finish_stage(pipe, moved, 0, 0.0)
    read, exported = [], []
    step = checkpoint_store.Committed(7, "step_00000007", f"{elsewhere}/step_00000007")
    monkeypatch.setattr(
        checkpoint_store, "committed_checkpoints", lambda r: read.append(r) or [step]
    )
    monkeypatch.setattr(weights, "export", lambda src, dst: exported.append(src))
    (root / "pre").mkdir(parents=True)
    assert finish_stage(pipe, moved, 0, 0.0)["checkpoint"] == step.location
    assert read == [elsewhere] and exported == [step.location]
