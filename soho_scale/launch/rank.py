"""The one rank entry point: what every process started by DeepSpeed's launcher or torchrun runs.

- `python -m soho_scale.launch.rank train JOB [KEY=VALUE ...] [--run-dir DIR]`: one training
  rank (`soho_scale.engine.trainer.train`).
- `python -m soho_scale.launch.rank eval JOB [KEY=VALUE ...] --checkpoint CKPT [--out DIR]
  [--batch-size N]`: one evaluation rank (`soho_scale.engine.evaluate.run_evaluation`).

`rank_args` is the one place the training rank's command line is built (`rank_module_args`: in
the form DeepSpeed's launchers take it); the local launcher, the hostfile runner and the cluster
nodes' launcher (`soho_scale.launch.node`, in sbatch scripts and Kubernetes pods) all use it. The trainer and the evaluation (torch, DeepSpeed, the model) are
imported inside the commands: launchers import this module without them.
"""

from __future__ import annotations

import argparse
import os
import sys

from soho_scale.secrets import redact
from soho_scale.spec import SpecError, load_job

RANK_MODULE = "soho_scale.launch.rank"


def rank_args(job_path: str, overrides: list[str], run_dir: str | None = None) -> list[str]:
    """The arguments of `python -m soho_scale.launch.rank` for one training rank."""
    args = ["train", job_path, *overrides]
    return args + ["--run-dir", run_dir] if run_dir else args


def rank_module_args(job_path: str, overrides: list[str], run_dir: str | None = None) -> list[str]:
    """What each training rank runs, in the form both DeepSpeed launchers (the `deepspeed`
    runner and the per-node `deepspeed.launcher.launch`) take it: `--module` is their flag."""
    return ["--module", RANK_MODULE, *rank_args(job_path, overrides, run_dir)]


def eval_parser(prog: str) -> argparse.ArgumentParser:
    """The arguments of an evaluation rank; `soho-scale eval` takes the same plus --nproc."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Evaluate a checkpoint on the job's eval.streams (N local ranks)."
    )
    parser.add_argument("job", help="job YAML file (its eval.streams, data and model sections)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--checkpoint", required=True, help="exported .pt or checkpoint folder/URL")
    parser.add_argument("--out", help="output folder (default: runs/<job>/eval/<split>)")
    parser.add_argument("--batch-size", type=int, help="per rank (default: micro_batch_per_rank)")
    return parser


def train_rank(argv: list[str]) -> int:
    """One training rank: load the job (overrides applied and recorded) and train."""
    parser = argparse.ArgumentParser(prog=f"python -m {RANK_MODULE} train")
    parser.add_argument("job")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--run-dir")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_intermixed_args(argv)
    from soho_scale.engine.stop import StopFlag

    stop = StopFlag()  # first: a stop signal during the heavy imports below is kept
    try:
        job = load_job(args.job, args.overrides)
        from soho_scale.engine.trainer import train

        train(job, args.run_dir, stop)
    except SpecError as e:  # e.g. a resume refused: a cluster node starts ranks unchecked
        print(redact(f"error: {e}"), file=sys.stderr)
        return 2
    return 0


def eval_rank(argv: list[str]) -> int:
    """One evaluation rank. A user error (every one is a ValueError: SpecError, DataError,
    EvalError, WeightsError) is printed as `error: <message>` and exits with status 2."""
    from soho_scale.engine.evaluate import run_evaluation

    args = eval_parser(f"python -m {RANK_MODULE} eval").parse_intermixed_args(argv)
    try:
        job = load_job(args.job, args.overrides)
        out = args.out or os.path.join("runs", job.name, "eval", job.eval.split)
        run_evaluation(job, args.checkpoint, out, args.batch_size)
    except ValueError as e:
        print(redact(f"error: {e}"), file=sys.stderr)
        return 2
    return 0


COMMANDS = {"train": train_rank, "eval": eval_rank}


def main(argv: list[str]) -> int:
    """`train ...` or `eval ...`. DeepSpeed's launcher puts `--local_rank=N` before the
    command; it is accepted and ignored (each rank reads LOCAL_RANK from its environment)."""
    parser = argparse.ArgumentParser(prog=f"python -m {RANK_MODULE}")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    return COMMANDS[args.command](args.args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
