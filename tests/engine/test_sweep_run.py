"""`soho-scale sweep` for real: a two-variant (base, from_scratch), two-seed sweep of a tiny
pipeline (demo pre-training -> SNLI-VE fine-tune -> its evaluation, shrunk by the demo smoke
override set) on shards of the synthetic world on a local S3 server. Every pipeline runs, the
comparison has every cell, MLflow nests sweep -> pipelines -> stages, and a re-run skips it all.
A failed pipeline does not stop the others: the sweep compares what finished and exits 1."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from data_pipeline.loopback import LocalS3Server
from data_pipeline.synthetic import convert_world, write_world
from tests.engine.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SMOKE = "jobs/pipelines/override_sets/demo_smoke.yaml"


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    """The demo's shards (s3://soho-demo/...) from the synthetic world; the server's endpoint
    and credentials are in the environment the sweep's stages inherit."""
    world = tmp_path_factory.mktemp("world")
    write_world(str(world), seed=0, size="small")
    with LocalS3Server(buckets=["soho-demo"]) as server:
        convert_world(str(world), "s3://soho-demo")
        yield server


def _sweep(tmp_path) -> tuple[str, object]:
    pipeline = {
        "name": "tiny",
        "experiment": "unused",  # the sweep's experiment replaces it
        "run_root": "unused",
        "stages": [
            {"name": "pretrain", "train": "jobs/demo/pretrain.yaml"},
            {"name": "snli_ve", "train": "jobs/demo/snli_ve.yaml", "init_from": "pretrain"},
            {
                "name": "snli_ve-eval",
                "eval": "jobs/demo/snli_ve.yaml",
                "checkpoint": "snli_ve",
                # fewer, larger evaluation batches: the same numbers, sooner
                "overrides": ["batch.micro_batch_per_rank=16", "batch.global_batch=16"],
            },
        ],
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    root = tmp_path / "sweep"
    spec = {
        "name": "tiny_ablation",
        "experiment": "sweep-run-test",
        "run_root": str(root),
        "pipeline": str(tmp_path / "pipeline.yaml"),
        "override_set": SMOKE,
        "seeds": [0, 1],
        "variants": {"base": {}, "from_scratch": {"drop_stages": ["pretrain"]}},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    return str(tmp_path / "sweep.yaml"), root


def _run(path: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, "-m", "soho_scale.cli", "sweep", path]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_a_two_variant_two_seed_sweep_compares_every_cell(demo_shards, tmp_path):
    path, root = _sweep(tmp_path)
    first = _run(path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-3000:]
    pairs = [(v, s) for v in ("base", "from_scratch") for s in (0, 1)]
    for k, (variant, seed) in enumerate(pairs, 1):
        assert f"[{k}/4] {variant} seed {seed}: running in {root}/{variant}/seed{seed}" in (
            first.stdout
        )
        assert (root / variant / f"seed{seed}" / "report" / "results.csv").exists()
        # Each seed's jobs really ran with their seed (the resolved spec of the run).
        log = (root / variant / f"seed{seed}" / "snli_ve" / "stage.log").read_text()
        assert f" seed={seed} " in log
    assert not (root / "from_scratch" / "seed0" / "pretrain").exists()
    scratch_log = (root / "from_scratch" / "seed0" / "snli_ve" / "stage.log").read_text()
    assert "model.init_from=null" in scratch_log

    out = root / "comparison"
    for name in ("comparison.md", "comparison.csv", "comparison.json", "comparison.png"):
        assert (out / name).stat().st_size > 0, name
    assert f"comparison: {out}/comparison.md" in first.stdout
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["metric"] for r in rows} == {"accuracy"}
    assert sorted(r["variant"] for r in rows) == ["base", "from_scratch"]
    for row in rows:
        assert row["n"] == "2" and row["mean"] != "nan" and row["std"] != "nan"
    (scratch,) = [r for r in rows if r["variant"] == "from_scratch"]
    assert all(scratch[k] != "nan" for k in ("diff", "ci_lo", "ci_hi"))
    table = (out / "comparison.md").read_text()
    (line,) = [x for x in table.splitlines() if x.startswith("| snli_ve |")]
    assert "—" not in line and line.count("(2)") == 2

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("sweep-run-test")
    runs = client.search_runs([experiment.experiment_id])
    by_parent: dict[str, list] = {}
    for run in runs:
        by_parent.setdefault(run.data.tags.get("mlflow.parentRunId"), []).append(run)
    (sweep,) = [r for r in runs if r.data.tags.get("mlflow.runName") == "sweep-tiny_ablation"]
    assert sweep.info.status == "FINISHED"
    assert "base.snli_ve.SNLI-VE.val.accuracy" in sweep.data.metrics
    pipelines = by_parent[sweep.info.run_id]
    assert sorted((r.data.tags["variant"], r.data.tags["seed"]) for r in pipelines) == [
        (v, str(s)) for v, s in pairs
    ]
    for pipe in pipelines:
        stages = by_parent.get(pipe.info.run_id, [])
        expected = 2 if pipe.data.tags["variant"] == "base" else 1  # the training stages
        assert len(stages) == expected, pipe.data.tags
        # The seeds really differ: each training run's resolved spec has its pipeline's seed.
        assert {r.data.params["seed"] for r in stages} == {pipe.data.tags["seed"]}
        assert pipe.data.metrics  # its report's results, its own evaluation only

    started = time.time()
    again = _run(path)
    assert again.returncode == 0, again.stderr[-3000:]
    for k, (variant, seed) in enumerate(pairs, 1):
        assert f"[{k}/4] {variant} seed {seed}: done already, skipped" in again.stdout
    assert time.time() - started < 60


def test_a_failed_pipeline_is_named_and_the_others_are_still_compared(demo_shards, tmp_path):
    scratch = {"overrides": ["model.init_from=null"]}
    pipeline = {"name": "one", "experiment": "unused", "run_root": "unused", "stages": [
        {"name": "snli_ve", "train": "jobs/demo/snli_ve.yaml", **scratch},
        {"name": "snli_ve-eval", "eval": "jobs/demo/snli_ve.yaml", "checkpoint": "snli_ve"},
    ]}  # fmt: skip
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    missing = f"data.streams.0.remote={tmp_path / 'missing'}"
    root = tmp_path / "sweep"
    variants = {"base": {}, "broken": {"stage_overrides": {"snli_ve": [missing]}}}
    spec = {"name": "fail", "experiment": "sweep-fail-test", "run_root": str(root),
            "pipeline": str(tmp_path / "pipeline.yaml"), "override_set": SMOKE, "seeds": [0],
            "variants": variants}  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    result = _run(str(tmp_path / "sweep.yaml"))
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-3000:]
    assert "[2/2] broken seed 0: running in" in result.stdout  # after the base ran
    (failure,) = [x for x in result.stderr.splitlines() if x.startswith("soho-scale sweep:")]
    assert failure.startswith("soho-scale sweep: broken seed 0: stage snli_ve failed (exit ")
    table = (root / "comparison" / "comparison.md").read_text()
    (line,) = [x for x in table.splitlines() if x.startswith("| snli_ve |")]
    assert line.endswith(" (1) | — | — |"), line  # base's result; broken's cells say missing
    assert "failed: broken seed 0: stage snli_ve failed" in table
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sweep-fail-test").experiment_id])
    (sweep,) = [r for r in runs if r.data.tags.get("mlflow.runName") == "sweep-fail"]
    assert sweep.info.status == "FAILED" and "broken seed 0" in sweep.data.tags["failures"]
