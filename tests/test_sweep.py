"""Sweep specs (`soho-scale sweep`): their errors, how a variant changes the base pipeline, and the
statistics and table of the comparison. No training (tests/engine/test_sweep_run.py runs one)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from soho_scale.cli import main
from soho_scale.spec import load_job
from soho_scale.sweep import plan_sweep
from soho_scale.sweep_compare import (
    MISSING,
    compare,
    markdown_table,
    mean_std,
    t_quantile,
    welch_interval,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = "jobs/pipelines/demo.yaml"


def _spec(tmp_path: Path, **changes) -> str:
    spec = {
        "name": "t",
        "experiment": "sweep-test",
        "run_root": str(tmp_path / "sweep"),
        "pipeline": DEMO,
        "seeds": [0, 1],
        "variants": {"base": {}, "from_scratch": {"drop_stages": ["pretrain"]}},
        **changes,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.fixture(autouse=True)
def _repo(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"variants": {"base": {}, "x": {"drop_stages": ["nope"]}}},
         "variants.x.drop_stages: no stage 'nope' in jobs/pipelines/demo.yaml"),
        ({"variants": {"base": {}, "x": {"stage_overrides": {"nope": ["optim.cnn.lr=1"]}}}},
         "variants.x.stage_overrides: no stage 'nope'"),
        # every seed of such a variant would run one seed
        ({"variants": {"base": {}, "x": {"overrides": ["seed=5"]}}},
         "variants.x: 'seed=5': the sweep sets seed (seeds:); drop it"),
        ({"variants": {"base": {}, "x": {"stage_overrides": {"vqa": [" seed =5"]}}}},
         "variants.x: ' seed =5': the sweep sets seed"),
        # folders of their own: <run_root>/<variant>/, <run_root>/comparison/
        ({"variants": {"base": {}, "comparison": {}}}, "variants: 'comparison' is the sweep's own"),
        ({"variants": {"base": {}, "mlflow.db": {}}}, "variants: 'mlflow.db' is the sweep's own"),
        ({"variants": {"base": {}, "x\n": {}}}, "variants: 'x\\n' is not a name"),
        ({"variants": {"base": {}, "..": {}}}, "variants: '..' is not a name"),
        ({"variants": {"base": {}, "x": {"drop_stages": ["vqa"]}}},
         "variants.x.drop_stages: stage vqa-eval evaluates the dropped stage 'vqa'; drop it too"),
        ({"base": "full"}, "base: 'full' is not one of the variants"),
        ({"seeds": [0, 1, 0]}, "seeds: 0 appears twice"),
        ({"seeds": []}, "seeds: list should have at least 1 item"),
        ({"variants": {"base": {}, "x": {"overides": []}}}, "variants.x.overides: unknown key; did you mean 'overrides'?"),
        ({"variants": {"base": {}, "x": {"overrides": ["optim.cnn.lr=fast"]}}},
         "variants.x: stages.pretrain: optim.cnn.lr: expected a number, got 'fast'"),
    ],
)  # fmt: skip
def test_a_bad_sweep_spec_is_one_line_before_anything_starts(tmp_path, capsys, changes, message):
    path = _spec(tmp_path, **changes)
    assert main(["sweep", path]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"soho-scale sweep: {message}"), line
    assert not (tmp_path / "sweep").exists()  # nothing started


def test_a_variant_changes_the_base_pipeline_per_seed(tmp_path):
    path = _spec(tmp_path, variants={
        "base": {"overrides": ["objectives.itm_weight=0.5"]},
        "from_scratch": {"drop_stages": ["pretrain"], "stage_overrides": {"vqa": ["optim.rest.lr=2e-4"]}},
    })  # fmt: skip
    sweep, pipes = plan_sweep(path)
    assert [(v, s) for v, s, _ in pipes] == [
        ("base", 0), ("base", 1), ("from_scratch", 0), ("from_scratch", 1)
    ]  # fmt: skip
    base0, scratch1 = pipes[0][2], pipes[3][2]
    assert (base0.name, base0.experiment) == ("demo-base-seed0", "sweep-test")
    assert base0.run_root == str(tmp_path / "sweep" / "base" / "seed0")
    assert all(s.overrides == ["seed=0", "objectives.itm_weight=0.5"] for s in base0.stages)
    assert [s.name for s in scratch1.stages] == [s.name for s in base0.stages][1:]
    vqa, vqa_eval = scratch1.stages[0], scratch1.stages[1]
    assert vqa.init_from is None
    assert vqa.overrides == ["seed=1", "model.init_from=null", "optim.rest.lr=2e-4"]
    assert vqa_eval.overrides == ["seed=1"]
    assert load_job(vqa.train, vqa.overrides).model.init_from is None
    assert load_job(scratch1.stages[2].train, scratch1.stages[2].overrides).seed == 1


def test_only_runs_named_variants_and_rejects_unknown_ones(tmp_path, capsys):
    assert main(["sweep", _spec(tmp_path), "--only", "nope"]) == 2
    assert "soho-scale sweep: --only: no variant 'nope'" in capsys.readouterr().err


def test_a_finished_stage_of_another_recipe_is_refused_not_reused(tmp_path, capsys):
    """A stage's stage_done.json holds the resolved spec it ran: after a recipe change the sweep
    (and a pipeline) refuses in one line rather than skip the old result as done."""
    import json

    from soho_scale.engine.resume_check import spec_tree
    from soho_scale.pipeline import DONE, check_stage_specs, train_overrides

    path = _spec(tmp_path)
    _, pipes = plan_sweep(path)
    pipe = pipes[0][2]
    pretrain = pipe.stages[0]
    done = Path(pipe.run_root) / pretrain.name / DONE
    done.parent.mkdir(parents=True)

    def finished_with(*overrides: str) -> None:
        job = load_job(pretrain.train, [*train_overrides(pipe, pretrain), *overrides])
        done.write_text(json.dumps({"step": 800, "spec": spec_tree(job)}))

    finished_with()
    check_stage_specs(pipe)  # the same spec: skipped as done
    finished_with("tracking.log_every=1", "resources.procs_per_node=1")
    check_stage_specs(pipe)  # where it logged and ran: the same result
    done.write_text(json.dumps({"step": 800}))  # finished before stages recorded their spec
    check_stage_specs(pipe)
    finished_with("objectives.mvm_sample_prob=0.3")
    with pytest.raises(ValueError) as refused:
        check_stage_specs(pipe)
    assert str(refused.value) == (
        f"stages.pretrain: finished in {done.parent} with another spec: "
        "objectives.mvm_sample_prob 0.3 -> 0.015; use another run root, or remove that folder "
        "and the later stages' to run them again"
    )
    assert main(["sweep", path]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("soho-scale sweep: variants.base: stages.pretrain: finished in ")


def test_the_shipped_sweeps_load_and_every_variant_stage_spec_validates():
    for path in sorted((ROOT / "jobs" / "sweeps").glob("*.yaml")):
        sweep, pipes = plan_sweep(str(path))  # checks every stage spec of every pipeline
        assert len(pipes) == len(sweep.variants) * len(sweep.seeds)
        for variant, seed, pipe in pipes:
            for stage in pipe.stages:
                job = load_job(stage.train or stage.eval, list(stage.overrides))
                assert job.seed == seed, (variant, stage.name)


def test_mean_std_and_welch_interval_by_hand():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    # base mean 2, s 1; other mean 6, s 2: se^2 = 1/3 + 4/3, df = (5/3)^2 / ((1/9 + 16/9) / 2)
    # = 50/17 = 2.94 -> rounded down to 2: t = 4.303.
    diff, lo, hi = welch_interval([1.0, 2.0, 3.0], [4.0, 6.0, 8.0])
    half = 4.303 * math.sqrt(5 / 3)
    assert diff == 4.0
    assert lo == pytest.approx(4 - half) and hi == pytest.approx(4 + half)
    assert (t_quantile(1), t_quantile(30.9), t_quantile(31), t_quantile(0.4)) == (
        12.706, 2.042, 1.96, 12.706
    )  # fmt: skip
    diff, lo, hi = welch_interval([1.0], [2.0, 3.0])  # one value: no spread, no interval
    assert diff == 1.5 and math.isnan(lo) and math.isnan(hi)
    assert welch_interval([1.0, 1.0], [2.0, 2.0]) == (1.0, 1.0, 1.0)


def _row(task: str, metric: str, value: float) -> dict:
    return {"task": task, "dataset": "D", "split": "val", "protocol": "val", "metric": metric,
            "value": value}  # fmt: skip


def test_the_comparison_table_has_every_cell():
    results = {
        ("base", 0): [_row("vqa", "vqa_accuracy", 40.0), _row("snli_ve", "accuracy", 50.0)],
        ("base", 1): [_row("vqa", "vqa_accuracy", 42.0), _row("snli_ve", "accuracy", 52.0)],
        ("no_mvm", 0): [_row("vqa", "vqa_accuracy", 30.0)],  # its snli_ve never finished
        ("no_mvm", 1): [_row("vqa", "vqa_accuracy", 31.0)],
        ("no_itm", 0): [_row("vqa", "vqa_accuracy", 41.0), _row("snli_ve", "accuracy", 51.0)],
        ("no_itm", 1): [],  # the pipeline failed
    }
    rows = compare(results, ["base", "no_mvm", "no_itm"], "base")
    assert len(rows) == 6  # 2 results x 3 variants, missing ones included
    by = {(r["task"], r["variant"]): r for r in rows}
    assert (by["vqa", "base"]["n"], by["vqa", "base"]["mean"]) == (2, 41.0)
    # se^2 = 2/2 + 0.5/2, df = 1.25^2 / (1 + 0.0625) = 1.47 -> 1: t = 12.706
    half = 12.706 * math.sqrt(1.25)
    assert by["vqa", "no_mvm"]["diff"] == -10.5
    assert by["vqa", "no_mvm"]["ci_lo"] == pytest.approx(-10.5 - half)
    assert by["snli_ve", "no_mvm"]["n"] == 0 and math.isnan(by["snli_ve", "no_mvm"]["mean"])
    table = markdown_table(rows, ["base", "no_mvm", "no_itm"], "base")
    lines = table.splitlines()
    assert lines[0] == (
        "| task | dataset | split | protocol | metric | base | no_mvm | no_itm | Δ no_mvm | Δ no_itm |"
    )
    assert lines[2].startswith(
        "| vqa | D | val | val | vqa_accuracy | 41.00 ± 1.41 (2) | 30.50 ± 0.71 (2)"
    )
    assert lines[2].endswith(f"| 41.00 ± 0.00 (1) | -10.50 [-24.71, +3.71] | +0.00 [{MISSING}] |")
    wider = {**results, ("base", 2): [_row("vqa", "vqa_accuracy", 41.0)],
             ("no_mvm", 2): [_row("vqa", "vqa_accuracy", 30.5)]}  # fmt: skip
    wider_table = markdown_table(compare(wider, ["base", "no_mvm"], "base"), ["base", "no_mvm"],
                                 "base")  # fmt: skip
    # n=3 each, s 1 and 0.5: se^2 = 1/3 + 0.25/3, df = 2.94 -> 2: t = 4.303, half = 2.78;
    # the interval excludes 0.
    assert wider_table.splitlines()[2].endswith("| -10.50 [-13.28, -7.72] * |")
    assert lines[3] == (
        f"| snli_ve | D | val | val | accuracy | 51.00 ± 1.41 (2) | {MISSING} | 51.00 ± 0.00 (1) "
        f"| {MISSING} | +0.00 [{MISSING}] |"
    )
    for line in lines[2:]:
        assert all(cell.strip() for cell in line.strip("|").split("|"))
