"""`soho-scale pipeline SPEC --scheduler slurm`: every stage a Slurm job, each after its inputs.

- A training stage is the sbatch script of `soho-scale launch --scheduler slurm` for its job
  (`resources.nodes` nodes, the stage's `nproc` ranks on each, CPUs and memory from the job's
  `resources`, requeued on preemption), ending with `soho-scale pipeline SPEC --finish-stage
  NAME`: the export of its last checkpoint and its done marker, or its run marked FAILED.
- An eval stage is one node running `soho-scale pipeline SPEC --stage NAME`.
- A last job writes the report (with eval stages) and finishes the pipeline's MLflow run
  (`--report`).
A stage waits for the stages it reads (`--dependency=afterok`); a failed stage cancels what waits
on it (`--kill-on-invalid-dep`). Submitting again skips the stages that finished and waits on the
ones still queued or running from the last submission (their job ids: `<stage>/slurm_job`). The
run root must be on a filesystem every node sees: stages hand weights on through it. Each stage's
log is `<run_root>/<stage>/stage.log`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys

from soho_scale.engine.tracking import PARENT_ENV
from soho_scale.launch.environment import cluster_env
from soho_scale.launch.errors import ClusterError, no_control_characters
from soho_scale.launch.node import NodeShape
from soho_scale.launch.slurm import sbatch_options, sbatch_script, script_head, slurm_options
from soho_scale.launch.submit import relative_job_path
from soho_scale.pipeline import DONE, Pipeline, Stage, load_pipeline, open_parent, train_overrides
from soho_scale.spec import load_job

JOB_FILE = "slurm_job"  # in the stage's folder: the id of the Slurm job that runs it
# The states a job never leaves; any other (pending, running, requeued, held...) is live.
ENDED = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "REVOKED", "TIMEOUT",
}  # fmt: skip


def submit_pipeline(args: argparse.Namespace) -> dict[str, str]:
    """Submit every unfinished stage (and the report); returns {stage: Slurm job id}."""
    if shutil.which("sbatch") is None:
        raise ClusterError("sbatch not found; submit the pipeline from a Slurm login node")
    pipe = load_pipeline(args.pipeline, args.override_set, args.run_root)
    pipe = pipe.model_copy(update={"run_root": os.path.abspath(pipe.run_root)})
    workdir = os.path.abspath(args.workdir)
    again = [relative_job_path(args.pipeline, workdir)]  # how the stages' jobs name the pipeline
    if args.override_set:
        again += ["--override-set", relative_job_path(args.override_set, workdir)]
    again += ["--run-root", no_control_characters("--run-root", pipe.run_root)]
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        print(
            "note: the stages share a sqlite MLflow store in the run root; stages running at "
            "once on several nodes should track to a server (MLFLOW_TRACKING_URI)",
            file=sys.stderr,
        )
    parent = open_parent(pipe, args.pipeline)
    env = {**cluster_env(dict(os.environ), args.cpu), PARENT_ENV: parent.run_id or ""}
    setup, options = slurm_options(args, workdir)
    ids: dict[str, str] = {}
    for stage in pipe.stages:
        folder = os.path.join(pipe.run_root, stage.name)
        if os.path.exists(os.path.join(folder, DONE)):
            print(f"{stage.name}: done already, skipped")
            continue
        live = _live_job(folder)
        if live:
            ids[stage.name] = live
            print(f"{stage.name}: still queued or running as Slurm job {live}")
            continue
        after = [ids[s] for s in (stage.init_from, stage.checkpoint) if s in ids]
        script = _stage_script(pipe, stage, again, workdir, env, setup, options, args.cpu)
        # An eval stage writes stage.log itself (the evaluation's output); Slurm's goes beside.
        log = "stage.log" if stage.train else "slurm-%j.log"
        ids[stage.name] = _sbatch(script, folder, after, log)
        print(f"{stage.name}: Slurm job {ids[stage.name]}" + _after(after))
    # The last job: the report (with eval stages) and the pipeline's run FINISHED.
    folder = os.path.join(pipe.run_root, "report")
    report = _live_job(folder)
    if report:
        print(f"report: still queued or running as Slurm job {report}")
    else:
        command = shlex.join(["pipeline", *again, "--report"])
        script = _one_node_script(
            pipe, "report", REPORT_SHAPE, command, workdir, env, setup, options
        )
        report = _sbatch(script, folder, list(ids.values()))
        print(f"report: Slurm job {report}" + _after(list(ids.values())))
    parent.finish("SCHEDULED")  # the report job finishes it; a failed stage fails it
    return ids


def _stage_script(
    pipe: Pipeline, stage: Stage, again: list[str], workdir: str, env: dict[str, str],
    setup: list[str], options: dict[str, str | None], cpu: bool,
) -> str:  # fmt: skip
    if stage.eval is not None:
        job = load_job(stage.eval, list(stage.overrides))
        shape = NodeShape.of(job, 1, stage.nproc, gpus=not cpu)
        command = shlex.join(["pipeline", *again, "--stage", stage.name])
        return _one_node_script(pipe, stage.name, shape, command, workdir, env, setup, options)
    overrides = train_overrides(pipe, stage)
    job = load_job(stage.train, overrides)
    shape = NodeShape.of(job, job.resources.nodes, stage.nproc, gpus=not cpu)
    finish = shlex.join(["python", "-m", "soho_scale.cli", "pipeline", *again])
    finish += f' --finish-stage {shlex.quote(stage.name)} --status "$status"; exit $?'
    return sbatch_script(
        job, relative_job_path(stage.train, workdir), overrides, shape, None, workdir, env,
        os.path.join(pipe.run_root, stage.name), setup, options, finish,
    )  # fmt: skip


# The report reads MLflow and draws a chart: one core, a little memory, no GPU.
REPORT_SHAPE = NodeShape(
    nodes=1, procs=1, gpus=False, cpus=1, mem_gib=4, exclusive=False, grace_s=60
)


def _one_node_script(
    pipe: Pipeline, name: str, shape: NodeShape, command: str, workdir: str,
    env: dict[str, str], setup: list[str], options: dict[str, str | None],
) -> str:  # fmt: skip
    """A one-node, one-task job running `soho-scale COMMAND` (an eval stage, the report)."""
    head = script_head(
        [f"soho-scale pipeline {pipe.name}: {name}, {shape.describe()}."],
        sbatch_options(
            f"{pipe.name}-{name}", shape, options.get("partition"), options.get("time"),
            options.get("account"),
        ),
        workdir, env, setup,
    )  # fmt: skip
    return "\n".join([*head, f"exec python -m soho_scale.cli {command}"]) + "\n"


def _sbatch(script: str, folder: str, after: list[str], log: str = "stage.log") -> str:
    """Submit `script` (kept as folder/stage.sbatch, its output in folder/LOG); the job id."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "stage.sbatch")
    with open(path, "w") as f:
        f.write(script)
    command = ["sbatch", "--parsable", f"--output={os.path.join(folder, log)}"]
    if after:
        command += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
    done = subprocess.run([*command, path], capture_output=True, text=True)
    if done.returncode != 0:
        raise ClusterError(f"sbatch refused {path}: {' '.join(done.stderr.split())}")
    job_id = done.stdout.strip().split(";")[0]
    with open(os.path.join(folder, JOB_FILE), "w") as f:
        f.write(job_id + "\n")
    return job_id


def _live_job(folder: str) -> str | None:
    """The Slurm job of an earlier submission still queued or running this stage, if any."""
    path = os.path.join(folder, JOB_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        job_id = f.read().strip()
    done = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True
    )
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        # Not knowing whether it still runs, submitting again could put two jobs on one stage.
        raise ClusterError(f"squeue -j {job_id}: {' '.join(done.stderr.split())}")
    state = done.stdout.strip()
    return job_id if state and state not in ENDED else None


def _after(ids: list[str]) -> str:
    return f", after {', '.join(ids)}" if ids else ""
