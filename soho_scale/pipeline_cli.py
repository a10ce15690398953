"""`soho-scale pipeline`: the command line of `soho_scale.pipeline` (run here, or across the
hosts of a hostfile) and of `soho_scale.launch.pipeline_slurm` (every stage a Slurm job), and the
pieces of a submitted pipeline its Slurm jobs run (`--stage`, `--finish-stage`, `--report`)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from soho_scale.engine.tracking import mark_failed
from soho_scale.pipeline import (
    StageFailed,
    finish_pipeline,
    finish_stage,
    load_pipeline,
    parent_tracker,
    run_pipeline,
    run_stage,
)
from soho_scale.secrets import redact


def pipeline_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="soho-scale pipeline", description="pre-train -> fine-tunes -> evaluations, resumable"
    )
    parser.add_argument("pipeline", help="jobs/pipelines/NAME.yaml")
    parser.add_argument(
        "--override-set",
        metavar="FILE",
        help="run_root, experiment, nproc and job overrides for every stage "
        "(e.g. jobs/pipelines/override_sets/rehearsal_cpu.yaml)",
    )
    parser.add_argument("--run-root", help="where the stages run (default: the spec's run_root)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--hostfile", help="training stages across these hosts (DeepSpeed runner)")
    where.add_argument(
        "--scheduler", choices=["slurm"], help="every stage a Slurm job, each after its inputs"
    )
    slurm = parser.add_argument_group("--scheduler slurm (as for `soho-scale launch`)")
    slurm.add_argument("--cpu", action="store_true", help="ranks on CPU over gloo")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", help="each stage's time limit")
    slurm.add_argument("--account")
    slurm.add_argument("--workdir", default=".", help="repo root on the nodes")
    slurm.add_argument("--setup", action="append", help="shell line before each stage")
    # What the stages' Slurm jobs run on their allocation.
    inside = parser.add_mutually_exclusive_group()
    inside.add_argument("--stage", metavar="NAME", help="run this one stage here")
    inside.add_argument("--finish-stage", metavar="NAME", help="after a training stage's ranks")
    inside.add_argument("--report", action="store_true", help="every stage done: the report")
    parser.add_argument("--status", type=int, default=0, help="with --finish-stage: their exit")
    args = parser.parse_args(argv)
    if not args.scheduler:
        given = [
            f"--{k}" for k in ("cpu", "partition", "time", "account", "setup") if getattr(args, k)
        ]
        if given:
            parser.error(f"{', '.join(given)}: only with --scheduler slurm")
    try:
        if args.scheduler:
            from soho_scale.launch.pipeline_slurm import submit_pipeline

            submit_pipeline(args)
            return 0
        if args.stage or args.finish_stage or args.report:
            return _inside_job(args)
        out = run_pipeline(args.pipeline, args.override_set, args.run_root, args.hostfile)
    except StageFailed as e:
        print(redact(f"soho-scale pipeline: {e}"), file=sys.stderr)
        return 1
    _print_report(out)
    return 0


def _inside_job(args: argparse.Namespace) -> int:
    """One piece of a pipeline submitted to a scheduler, run on its allocation."""
    pipe = load_pipeline(args.pipeline, args.override_set, args.run_root)
    stages = {stage.name: stage for stage in pipe.stages}
    name = args.stage or args.finish_stage
    if name is not None and name not in stages:
        raise ValueError(f"no stage {name!r} in {args.pipeline}")
    if name is not None:
        try:
            if args.stage:
                run_stage(pipe, stages[name])
            else:
                finish_stage(pipe, stages[name], args.status, time.time())
        except StageFailed as e:
            mark_failed(pipe.run_root, str(e))  # the pipeline's parent run fails with it
            print(redact(f"soho-scale pipeline: {e}"), file=sys.stderr)
            return args.status or 1
    else:
        _print_report(finish_pipeline(pipe, parent_tracker(pipe)))
    return 0


def _print_report(out: str | None) -> None:
    if out is not None:
        with open(os.path.join(out, "results.md")) as f:
            print(f.read(), end="")
        print(f"report: {os.path.abspath(out)}")
