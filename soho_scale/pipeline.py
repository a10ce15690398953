"""`soho-scale pipeline jobs/pipelines/NAME.yaml`: pre-train -> fine-tunes -> evaluations.

A pipeline spec lists stages; each is a training job (`train:`) or an evaluation (`eval:` with
`checkpoint:` naming the stage whose weights it evaluates). A training stage can start from an
earlier stage's weights (`init_from: STAGE`): the pipeline exports that stage's last committed
checkpoint and passes it as `model.init_from`. Every stage runs in `<run_root>/<stage>`; a stage
that finished leaves `stage_done.json` (its result and the resolved spec it ran) and is skipped
when the pipeline is run again with that spec (another is refused: `stale_problem`), and an
interrupted training stage resumes from its own checkpoints. One MLflow parent run holds the
pipeline; each stage's run is its child. At the end the results report is written and logged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from soho_scale.engine.tracking import METRICS_FILE, PARENT_ENV, PENDING, RUN_INFO, mark_failed
from soho_scale.spec.errors import credentials_problem, format_spec_error
from soho_scale.spec.schema import NAME, SPEC_CONFIG
from soho_scale.spec.yaml_file import read_job_file

DONE = "stage_done.json"


class StageFailed(RuntimeError):
    """A stage's command failed; the message is one line with the reason and the log."""


# What a pipeline (or sweep) keeps in its run root: no stage (or variant) may be named so.
RESERVED = ("report", "mlartifacts", "mlflow.db", METRICS_FILE, PENDING, RUN_INFO)


class Stage(BaseModel):
    model_config = SPEC_CONFIG
    name: str = Field(pattern=NAME)
    train: str | None = None  # job YAML to train
    eval: str | None = None  # job YAML whose eval.streams to evaluate
    init_from: str | None = None  # train: start from this earlier stage's weights
    checkpoint: str | None = None  # eval: the stage whose weights to evaluate
    nproc: int = Field(2, ge=1, strict=True)  # strict: YAML's yes/on are not 1
    overrides: list[str] = []

    @model_validator(mode="after")
    def _one_kind(self) -> Stage:
        if (self.train is None) == (self.eval is None):
            raise ValueError("give exactly one of train or eval")
        if self.eval is not None and self.checkpoint is None:
            raise ValueError("an eval stage needs checkpoint: <training stage>")
        if self.train is not None and self.checkpoint is not None:
            raise ValueError(
                "checkpoint: is for eval stages; a training stage starts from init_from"
            )
        if self.eval is not None and self.init_from is not None:
            raise ValueError("init_from: is for training stages; an eval stage names checkpoint")
        if self.name in RESERVED:
            raise ValueError(f"name: {self.name!r} is the pipeline's own ({', '.join(RESERVED)})")
        return self


class Pipeline(BaseModel):
    model_config = SPEC_CONFIG
    name: str = Field(pattern=NAME)
    experiment: str = Field(min_length=1)
    run_root: str = Field(min_length=1)
    chance: str | None = None  # chance levels of the dataset (the synthetic world writes one)
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> Pipeline:
        seen: dict[str, Stage] = {}
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"stages: {stage.name!r} appears twice")
            for ref in (stage.init_from, stage.checkpoint):
                if ref is not None and (ref not in seen or seen[ref].train is None):
                    raise ValueError(
                        f"stages.{stage.name}: {ref!r} is not an earlier training stage"
                    )
            seen[stage.name] = stage
        return self


class OverrideSet(BaseModel):
    """A pipeline run in other conditions without copying its file (`--override-set FILE`):
    another run_root and experiment, every stage on `nproc` ranks, and `overrides` applied to
    every stage's job before the stage's own, and `stage_overrides` after them (e.g.
    jobs/pipelines/override_sets/rehearsal_cpu.yaml)."""

    model_config = SPEC_CONFIG
    run_root: str | None = None
    experiment: str | None = None
    nproc: int | None = Field(None, ge=1, strict=True)
    overrides: list[str] = []
    stage_overrides: dict[str, list[str]] = {}  # stage name -> overrides after the others


def read_spec_file(kind: type[BaseModel], path: str) -> Any:
    """The spec file `path` as a `kind` (pipeline, override set, sweep); a bad one is one line
    naming the key and the file."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    data = read_job_file(path)
    found = credentials_problem(data)
    if found:
        raise ValueError(f"{found[1]} (in {path})")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"{format_spec_error(e, kind)} (in {path})") from None


def load_pipeline(
    path: str, override_set: str | None = None, run_root: str | None = None
) -> Pipeline:
    """The pipeline of `path`, with an override set's changes and another run root applied."""
    pipe = read_spec_file(Pipeline, path)
    if run_root:
        pipe = pipe.model_copy(update={"run_root": run_root})
    if override_set is None:
        return pipe
    extra = read_spec_file(OverrideSet, override_set)
    unknown = sorted(set(extra.stage_overrides) - {stage.name for stage in pipe.stages})
    if unknown:
        raise ValueError(f"stage_overrides: no stage {unknown[0]!r} in {path} (in {override_set})")
    stages = [
        stage.model_copy(
            update={
                "nproc": extra.nproc or stage.nproc,
                "overrides": [
                    *extra.overrides,
                    *stage.overrides,
                    *extra.stage_overrides.get(stage.name, []),
                ],
            }
        )
        for stage in pipe.stages
    ]
    return pipe.model_copy(
        update={
            "run_root": run_root or extra.run_root or pipe.run_root,
            "experiment": extra.experiment or pipe.experiment,
            "stages": stages,
        }
    )


def _run(cmd: list[str], log_path: str) -> int:
    """Run one stage's command; its output goes to the terminal and to the stage's log."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if _worth_showing(line):
                sys.stdout.write(line)
                sys.stdout.flush()
        return proc.wait()


def _failure(stage: Stage, code: int, log_path: str) -> StageFailed:
    """The stage's failure in one line: its last error line, and where the whole log is."""
    reason = ""
    with open(log_path, "a+", errors="replace") as f:
        f.seek(0)
        for line in f:
            text = line.strip()
            if "Error" in text or "error:" in text or text.startswith("soho-scale"):
                reason = text
    return StageFailed(
        f"stage {stage.name} failed (exit {code}){': ' + reason[:300] if reason else ''}; "
        f"see {log_path}"
    )


def _failed(stage: Stage, code: int, log_path: str, run_dir: str) -> StageFailed:
    """The stage's failure (see `_failure`), its MLflow run (tracked from `run_dir`) marked
    FAILED with it: a process that died could not say so itself."""
    failure = _failure(stage, code, log_path)
    mark_failed(run_dir, str(failure))
    return failure


def _worth_showing(line: str) -> bool:
    # The stage's own progress and results; DeepSpeed's and streaming's chatter stays in the log.
    return any(
        key in line
        for key in ("train:", "eval", "resumed", "ERROR", "Error", "soho-scale", '"metrics"')
    )


def _cli() -> list[str]:
    return [sys.executable, "-m", "soho_scale.cli"]


def export_path(run_root: str, stage: str) -> str:
    return os.path.join(run_root, stage, "export", "model.pt")


def train_overrides(pipe: Pipeline, stage: Stage) -> list[str]:
    """A training stage's overrides: its run's checkpoints, tracking names, the weights it starts
    from, then the stage's own."""
    run_dir = os.path.join(pipe.run_root, stage.name)
    overrides = [
        _setting("checkpoint.dir", os.path.join(run_dir, "checkpoints")),
        _setting("tracking.experiment", pipe.experiment),
        _setting("tracking.run_name", f"{pipe.name}-{stage.name}"),
        *stage.overrides,
    ]
    if stage.init_from:
        overrides.append(_setting("model.init_from", export_path(pipe.run_root, stage.init_from)))
    return overrides


def eval_overrides(pipe: Pipeline, stage: Stage) -> list[str]:
    """An eval stage's overrides: the pipeline's experiment, then the stage's own."""
    return [_setting("tracking.experiment", pipe.experiment), *stage.overrides]


def _setting(key: str, text: str) -> str:
    """`key=text` as an override that reads back as exactly `text`: a double-quoted YAML scalar
    where YAML would read it otherwise, so a run root with " #" or ": " in it, or an experiment
    named 010, stays what it says."""
    try:
        plain = yaml.safe_load(text) == text
    except yaml.YAMLError:
        plain = False
    if plain:
        return f"{key}={text}"
    quoted = yaml.safe_dump(text, default_style='"', allow_unicode=True, width=float("inf"))
    quoted = quoted.removesuffix("\n")
    if yaml.safe_load(quoted) != text:
        raise ValueError(f"{key}: {text!r} cannot be handed on as an override")
    return f"{key}={quoted}"


def run_stage(pipe: Pipeline, stage: Stage, hostfile: str | None = None) -> dict[str, Any]:
    """Run one stage here (a training stage across the hosts of `hostfile`, when given)."""
    run_dir = os.path.join(pipe.run_root, stage.name)
    os.makedirs(run_dir, exist_ok=True)
    log = os.path.join(run_dir, "stage.log")
    started = time.time()
    if stage.train is not None:
        if hostfile:  # DeepSpeed's runner across the hosts, stage.nproc ranks on each
            where = ["launch", "--hostfile", hostfile, "--gpus-per-node", str(stage.nproc)]
        else:
            where = ["train", "--nproc", str(stage.nproc)]
        cmd = [*_cli(), where[0], stage.train, *train_overrides(pipe, stage), *where[1:]]
        cmd += ["--run-dir", run_dir]
        result = finish_stage(pipe, stage, _run(cmd, log), started)
    else:
        weights = export_path(pipe.run_root, stage.checkpoint)
        out = os.path.join(run_dir, "eval")
        cmd = [
            *_cli(),
            "eval",
            stage.eval,
            *eval_overrides(pipe, stage),
            "--checkpoint",
            weights,
            "--out",
            out,
            "--nproc",
            str(stage.nproc),
        ]
        code = _run(cmd, log)
        if code:
            raise _failed(stage, code, log, out)
        with open(os.path.join(out, "metrics.json")) as f:
            result = json.load(f)
        _write_done(pipe, stage, result, started)
    return result


def finish_stage(pipe: Pipeline, stage: Stage, code: int, started: float) -> dict[str, Any]:
    """After a training stage's ranks exit with `code`: export its best committed checkpoint
    (when the job kept one, eval.every_steps) else its last, for the stages after it, and mark
    it done; or mark its run FAILED and raise StageFailed."""
    run_dir = os.path.join(pipe.run_root, stage.name)
    if code:
        raise _failed(stage, code, os.path.join(run_dir, "stage.log"), run_dir)
    from soho_scale.engine.checkpoint_store import committed_checkpoints, read_best
    from soho_scale.engine.weights import export

    where = stage_job(pipe, stage).checkpoint.dir  # the stage's overrides may move it (s3://)
    committed = committed_checkpoints(where)
    if not committed:
        raise StageFailed(f"stage {stage.name}: no committed checkpoint in {where}")
    best = read_best(where)
    chosen = next((c for c in committed if best and c.step == best["step"]), committed[-1])
    export(chosen.location, export_path(pipe.run_root, stage.name))
    result = {"checkpoint": chosen.location, "step": chosen.step}
    if best and chosen.step == best["step"]:
        result.update(best_step=best["step"], best_value=best["value"])
    _write_done(pipe, stage, result, started)
    return result


def _write_done(pipe: Pipeline, stage: Stage, result: dict[str, Any], started: float) -> None:
    """Mark a stage done with its result and the resolved spec it ran (what a re-run compares)."""
    from soho_scale.engine.resume_check import spec_tree

    result["seconds"] = round(time.time() - started, 1)
    done = {**result, "spec": spec_tree(stage_job(pipe, stage))}
    with open(os.path.join(pipe.run_root, stage.name, DONE), "w") as f:
        json.dump(done, f, indent=2)


def continued_tracker(root: str, experiment: str, name: str, tags: dict[str, str]):
    """The MLflow run tracked from the folder `root` (a pipeline's or a sweep's), continued when
    it ran there before."""
    from soho_scale.engine.tracking import RUN_INFO, Tracker

    info = os.path.join(root, RUN_INFO)
    run_id = None
    if os.path.exists(info):
        with open(info) as f:
            run_id = json.load(f)["run_id"]
    return Tracker(root, experiment, name, tags, run_id=run_id)


def parent_tracker(pipe: Pipeline):
    return continued_tracker(
        pipe.run_root, pipe.experiment, f"pipeline-{pipe.name}", {"pipeline": pipe.name}
    )


def open_parent(pipe: Pipeline, path: str):
    """The pipeline's MLflow parent run (continued when the pipeline ran before), its id in the
    environment its stages inherit. Every stage tracks into one store (a sqlite file in the
    run root) unless the user points at a server."""
    from soho_scale.report import chance_params

    check_stage_specs(pipe)  # a bad stage spec fails before the first stage starts
    os.makedirs(pipe.run_root, exist_ok=True)
    os.environ.setdefault(
        "MLFLOW_TRACKING_URI", f"sqlite:///{os.path.abspath(pipe.run_root)}/mlflow.db"
    )
    parent = parent_tracker(pipe)
    if not parent.reopened:  # a re-run continues the run; MLflow refuses a param's new value
        parent.log_params({"pipeline": path, "stages": ",".join(s.name for s in pipe.stages)})
        if pipe.chance and os.path.exists(pipe.chance):
            with open(pipe.chance) as f:
                parent.log_params(chance_params(json.load(f)))
    os.environ[PARENT_ENV] = parent.run_id or ""
    return parent


def run_pipeline(
    path: str,
    override_set: str | None = None,
    run_root: str | None = None,
    hostfile: str | None = None,
) -> str | None:
    """Run (or continue) a pipeline here (training stages across the hosts of `hostfile`, when
    given); returns the report folder (None without eval stages)."""

    return run_loaded(load_pipeline(path, override_set, run_root), path, hostfile)


def run_loaded(
    pipe: Pipeline, source: str, hostfile: str | None = None, tags: dict[str, str] | None = None
) -> str | None:
    """Run (or continue) the loaded pipeline `pipe` (read from `source`), its parent run tagged
    with `tags`; returns the report folder (None without eval stages)."""
    parent = open_parent(pipe, source)
    if tags:
        parent.set_tags(tags)
    total = len(pipe.stages)
    try:
        for i, stage in enumerate(pipe.stages, 1):
            done = os.path.join(pipe.run_root, stage.name, DONE)
            if os.path.exists(done):
                print(f"[{i}/{total}] {stage.name}: done already, skipped", flush=True)
                continue
            kind = "train" if stage.train else "eval"
            print(f"[{i}/{total}] {stage.name}: {kind} ...", flush=True)
            result = run_stage(pipe, stage, hostfile)
            summary = result.get("metrics", {"step": result.get("step")})
            print(
                f"[{i}/{total}] {stage.name}: finished in {result['seconds']} s {summary}",
                flush=True,
            )
    except StageFailed as e:
        parent.set_tags({"failure": str(e)})
        parent.finish("FAILED")
        raise
    return finish_pipeline(pipe, parent)


def finish_pipeline(pipe: Pipeline, parent) -> str | None:  # noqa: ANN001
    """Every stage done: the report (when there are eval stages), its rows and files on the
    parent run, which ends FINISHED; returns the report folder."""
    from soho_scale.report import report

    out = None
    if any(stage.eval for stage in pipe.stages):
        out = os.path.join(pipe.run_root, "report")
        # Only this pipeline's evaluations: the experiment may hold other pipelines' (a sweep).
        rows, files = report(pipe.experiment, out, parent_run_id=parent.run_id)
        # The final results on the parent run: pipelines compare side by side in MLflow's charts.
        parent.log_metrics(
            {
                f"{r['task']}.{r['dataset']}.{r['protocol']}.{r['metric']}": r["value"]
                for r in rows
                if r["value"] == r["value"]  # not NaN (a submission row)
            },
            0,
        )
        for file in files:
            parent.log_artifact(file)
    parent.finish()
    return out


# Spec keys whose change leaves a finished stage's result as it is: where it was logged and saved,
# where it ran, how patiently its data was fetched. Any other change (the model, the data, the
# steps, the evaluation...) makes it another stage, which the folder does not hold.
KEEPS_RESULT = (
    "name",
    "tracking",
    "checkpoint",
    "resources",
    "data.download_retry",
    "data.download_timeout",
    "data.download_deadline_s",
    "data.stall_timeout_s",
    "data.validate_hash",
    "data.cache_dir",
)


def stage_job(pipe: Pipeline, stage: Stage) -> Any:
    """The job a stage runs: its spec file with the overrides the stage runs with."""
    from soho_scale.spec import load_job

    if stage.train:
        return load_job(stage.train, train_overrides(pipe, stage))
    return load_job(stage.eval, eval_overrides(pipe, stage))


def stale_problem(pipe: Pipeline, stage: Stage, job: Any) -> str | None:
    """One line when a finished stage ran another spec than `job` (None: the same, up to
    KEEPS_RESULT keys, or it finished before stages recorded their spec)."""
    from soho_scale.engine.resume_check import listed, spec_changes

    done = os.path.join(pipe.run_root, stage.name, DONE)
    if not os.path.exists(done):
        return None
    with open(done) as f:
        saved = json.load(f).get("spec")
    if saved is None:
        return None
    changes = [c for c in spec_changes(saved, job) if not c.under(KEEPS_RESULT)]
    if not changes:
        return None
    return (
        f"stages.{stage.name}: finished in {os.path.dirname(done)} with another spec: "
        f"{listed(changes)}; use another run root, or remove that folder and the later stages' "
        "to run them again"
    )


def check_stage_specs(pipe: Pipeline) -> None:
    """Every stage's job spec, with the overrides the stage runs with, loads, and every finished
    stage ran that spec; or one line names the stage (a bad last stage fails before the first
    starts, and a changed recipe never reuses the results of the old one)."""
    from soho_scale.spec import SpecError

    for stage in pipe.stages:
        try:
            job = stage_job(pipe, stage)
        except SpecError as e:
            raise ValueError(f"stages.{stage.name}: {e}") from None
        problem = stale_problem(pipe, stage, job)
        if problem:
            raise ValueError(problem)
