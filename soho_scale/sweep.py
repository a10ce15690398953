"""`soho-scale sweep jobs/sweeps/NAME.yaml`: ablations of a pipeline, each over several seeds.

A sweep spec names a base pipeline, variants of it (dotted job overrides for every stage or for
named stages, stages dropped) and seeds. Every (variant, seed) pair is one pipeline, built from the
base in memory, running in `<run_root>/<variant>/seed<N>` with `seed=N` in every stage's job. All
their stage specs are checked before the first starts. A pipeline that finished (its report
written, every stage done) is skipped on a re-run; an interrupted one continues where it stopped.
A failed pipeline does not stop the others: the sweep runs them all, compares what finished, then
exits 1 with one line per failure. Ctrl-C stops the sweep.

The comparison (`soho_scale.sweep_compare`) goes to `<run_root>/comparison/`. In MLflow the sweep
is one parent run (`sweep-<name>`) whose children are the pipelines' parent runs (tagged `variant`
and `seed`), whose children are their stages' runs; one store for the whole sweep (a sqlite file
in its run root) unless MLFLOW_TRACKING_URI says otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from pydantic import BaseModel, Field, StrictInt

from soho_scale.engine.tracking import PARENT_ENV
from soho_scale.pipeline import (
    DONE,
    RESERVED,
    Pipeline,
    StageFailed,
    check_stage_specs,
    continued_tracker,
    load_pipeline,
    read_spec_file,
    run_loaded,
)
from soho_scale.secrets import redact
from soho_scale.spec.schema import NAME, SPEC_CONFIG
from soho_scale.sweep_compare import compare, read_results, write_comparison


class Variant(BaseModel):
    model_config = SPEC_CONFIG
    overrides: list[str] = []  # every stage's job, after the stage's own overrides
    stage_overrides: dict[str, list[str]] = {}  # stage name -> overrides after all others
    drop_stages: list[str] = []  # stages left out; their consumers start from no weights


class Sweep(BaseModel):
    model_config = SPEC_CONFIG
    name: str = Field(pattern=NAME)
    experiment: str = Field(min_length=1)
    run_root: str = Field(min_length=1)
    pipeline: str  # the base pipeline spec
    override_set: str | None = None  # applied to the base pipeline as --override-set does
    seeds: list[StrictInt] = Field(min_length=1)
    base: str = "base"  # the variant the others are compared with
    variants: dict[str, Variant] = Field(min_length=1)


def _inconsistency(sweep: Sweep) -> str | None:
    repeated = sorted({s for s in sweep.seeds if sweep.seeds.count(s) > 1})
    if repeated:
        return f"seeds: {repeated[0]} appears twice"
    bad = [name for name in sweep.variants if re.fullmatch(NAME, name) is None]
    if bad:
        return f"variants: {bad[0]!r} is not a name (letters, digits, _ . -; no leading dot)"
    taken = sorted(set(sweep.variants) & {"comparison", *RESERVED})  # the sweep root's own
    if taken:
        return (
            f"variants: {taken[0]!r} is the sweep's own folder or file; name the variant otherwise"
        )
    for name, variant in sweep.variants.items():
        seeded = [o for o in (*variant.overrides, *sum(variant.stage_overrides.values(), []))
                  if o.partition("=")[0].strip() == "seed"]  # fmt: skip
        if seeded:
            return f"variants.{name}: {seeded[0]!r}: the sweep sets seed (seeds:); drop it"
    if sweep.base not in sweep.variants:
        return f"base: {sweep.base!r} is not one of the variants"
    return None


def load_sweep(path: str, run_root: str | None = None) -> tuple[Sweep, Pipeline]:
    """The sweep of `path` (with another run root, when given) and its base pipeline; a variant
    naming a stage the pipeline lacks is one line."""
    sweep = read_spec_file(Sweep, path)
    problem = _inconsistency(sweep)
    if problem:
        raise ValueError(f"{problem} (in {path})")
    if run_root:
        sweep = sweep.model_copy(update={"run_root": run_root})
    base = load_pipeline(sweep.pipeline, sweep.override_set)
    names = {stage.name for stage in base.stages}
    for name, variant in sweep.variants.items():
        for field, stages in (("drop_stages", variant.drop_stages),
                              ("stage_overrides", variant.stage_overrides)):  # fmt: skip
            unknown = sorted(set(stages) - names)
            if unknown:
                raise ValueError(
                    f"variants.{name}.{field}: no stage {unknown[0]!r} in {sweep.pipeline} "
                    f"(in {path})"
                )
    return sweep, base


def variant_pipeline(sweep: Sweep, base: Pipeline, name: str, seed: int) -> Pipeline:
    """The pipeline of variant `name` with `seed`: the base without the variant's dropped stages,
    every stage's job with `seed=N` and the variant's overrides after the stage's own."""
    variant = sweep.variants[name]
    dropped = set(variant.drop_stages)
    stages = []
    for stage in base.stages:
        if stage.name in dropped:
            continue
        if stage.checkpoint in dropped:
            raise ValueError(
                f"variants.{name}.drop_stages: stage {stage.name} evaluates the dropped stage "
                f"{stage.checkpoint!r}; drop it too"
            )
        overrides = [*stage.overrides, f"seed={seed}"]
        update: dict[str, object] = {}
        if stage.init_from in dropped:  # its job's own init_from (a file) goes as well
            update["init_from"] = None
            overrides.append("model.init_from=null")
        overrides += [*variant.overrides, *variant.stage_overrides.get(stage.name, [])]
        stages.append(stage.model_copy(update={**update, "overrides": overrides}))
    if not stages:
        raise ValueError(f"variants.{name}.drop_stages: no stage is left")
    return base.model_copy(
        update={
            "name": f"{base.name}-{name}-seed{seed}",
            "experiment": sweep.experiment,
            "run_root": os.path.join(sweep.run_root, name, f"seed{seed}"),
            "stages": stages,
        }
    )


def plan_sweep(
    path: str, run_root: str | None = None, only: list[str] | None = None
) -> tuple[Sweep, list[tuple[str, int, Pipeline]]]:
    """The sweep and its (variant, seed, pipeline) triples, every stage spec of every pipeline to
    run (those of the variants `only`, when given) checked: a bad variant fails before anything
    starts."""
    sweep, base = load_sweep(path, run_root)
    unknown = sorted(set(only or []) - set(sweep.variants))
    if unknown:
        raise ValueError(f"--only: no variant {unknown[0]!r} in {path}")
    pipes = []
    for name in sweep.variants:
        for seed in sweep.seeds:
            pipe = variant_pipeline(sweep, base, name, seed)
            if not only or name in only:
                try:
                    check_stage_specs(pipe)
                except ValueError as e:
                    raise ValueError(f"variants.{name}: {e}") from None
            pipes.append((name, seed, pipe))
    return sweep, pipes


def finished(pipe: Pipeline) -> bool:
    """The pipeline wrote its report and every stage is done."""
    root = pipe.run_root
    report = os.path.join(root, "report", "results.csv")
    return os.path.exists(report) and all(
        os.path.exists(os.path.join(root, stage.name, DONE)) for stage in pipe.stages
    )


def sweep_tracker(sweep: Sweep):
    """The sweep's MLflow parent run, continued when the sweep ran before."""
    return continued_tracker(
        sweep.run_root, sweep.experiment, f"sweep-{sweep.name}", {"sweep": sweep.name}
    )


def run_sweep(
    path: str, run_root: str | None = None, only: list[str] | None = None
) -> tuple[str, str, list[str]]:
    """Run (or continue) every pipeline of the sweep (of the variants `only`, when given), then
    compare the results of all its pipelines. Returns the comparison table (Markdown), its
    folder, and one line per failed pipeline."""
    sweep, pipes = plan_sweep(path, run_root, only)
    os.makedirs(sweep.run_root, exist_ok=True)
    os.environ.setdefault(
        "MLFLOW_TRACKING_URI", f"sqlite:///{os.path.abspath(sweep.run_root)}/mlflow.db"
    )
    outer = os.environ.pop(PARENT_ENV, None)  # the sweep's run is no one's child
    try:
        parent = sweep_tracker(sweep)
        if not parent.reopened:  # MLflow refuses a param's new value
            parent.log_params(
                {"sweep": path, "pipeline": sweep.pipeline, "base": sweep.base,
                 "variants": ",".join(sweep.variants), "seeds": ",".join(map(str, sweep.seeds))}
            )  # fmt: skip
        chosen = [p for p in pipes if not only or p[0] in only]
        failures = _run_all(sweep, chosen, parent.run_id or "")
        table, out = _compare(sweep, pipes, parent, failures)
    finally:
        if outer is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = outer
    return table, out, failures


def _run_all(sweep: Sweep, pipes: list[tuple[str, int, Pipeline]], parent_id: str) -> list[str]:
    failures = []
    total = len(pipes)
    for k, (name, seed, pipe) in enumerate(pipes, 1):
        label = f"[{k}/{total}] {name} seed {seed}"
        if finished(pipe):
            print(f"{label}: done already, skipped", flush=True)
            continue
        print(f"{label}: running in {pipe.run_root}", flush=True)
        os.environ[PARENT_ENV] = parent_id  # the pipeline's parent run: a child of the sweep's
        try:
            tags = {"sweep": sweep.name, "variant": name, "seed": str(seed)}
            run_loaded(pipe, sweep.pipeline, tags=tags)
        except (StageFailed, ValueError, OSError) as e:  # the other pipelines do not depend on it
            failures.append(redact(f"{name} seed {seed}: {e}"))
            print(f"{label}: failed: {failures[-1]}", flush=True)
    return failures


def _compare(sweep: Sweep, pipes, parent, failures: list[str]) -> tuple[str, str]:  # noqa: ANN001
    results = {(name, seed): read_results(pipe.run_root) for name, seed, pipe in pipes}
    variants = list(sweep.variants)
    rows = compare(results, variants, sweep.base)
    out = os.path.join(sweep.run_root, "comparison")
    table, files = write_comparison(rows, variants, sweep.base, failures, out)
    parent.log_metrics(
        {
            f"{r['variant']}.{r['task']}.{r['dataset']}.{r['protocol']}.{r['metric']}": r["mean"]
            for r in rows
            if r["n"]
        },
        0,
    )
    for file in files:
        parent.log_artifact(file)
    if failures:
        parent.set_tags({"failures": " | ".join(failures)[:4000]})
    parent.finish("FAILED" if failures else "FINISHED")
    return table, out


def sweep_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="soho-scale sweep", description="ablations of a pipeline over seeds, compared"
    )
    parser.add_argument("sweep", help="jobs/sweeps/NAME.yaml")
    parser.add_argument("--run-root", help="where the pipelines run (default: the spec's)")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants")
    args = parser.parse_args(argv)
    table, out, failures = run_sweep(args.sweep, args.run_root, args.only)
    print(table)
    print(f"comparison: {os.path.abspath(os.path.join(out, 'comparison.md'))}")
    for failure in failures:
        print(f"soho-scale sweep: {failure}", file=sys.stderr)
    return 1 if failures else 0
