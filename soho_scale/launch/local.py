"""From a job spec to ranks on this machine: `soho-scale train` and `soho-scale eval`.

`soho-scale train`: the node launcher (`soho_scale.launch.node`, the one every cluster node runs)
for N local ranks, each running `python -m soho_scale.launch.rank train JOB [overrides]
[--run-dir DIR]`; SIGTERM/SIGINT go to the ranks, which checkpoint and exit 75, and the command
exits with that status.
`soho-scale eval`: torchrun for N local ranks, each running
`python -m soho_scale.launch.rank eval ...`, or the evaluation in this process for one rank.
The spec is validated before anything starts. The parent imports neither torch, DeepSpeed nor
the model (a one-rank `eval` runs in it): the ranks import them anyway, so the parent's imports
would only add start-up time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from soho_scale.launch.node import run_node
from soho_scale.launch.rank import RANK_MODULE, eval_parser, eval_rank, rank_args
from soho_scale.secrets import redact
from soho_scale.spec import Job, SpecError, load_job
from soho_scale.spec.derived import accumulation_steps


def refuse_unsupported_patches() -> None:
    """A correctness patch the ranks would install that cannot vouch for the installed library
    refuses here, with one line (PatchError), before any rank starts."""
    from data_pipeline.patches import streaming_shard_state

    streaming_shard_state.install()


def refuse_changed_resume(job: Job) -> None:
    """A resume with a spec change it may not resume with is refused here, with one line
    (SpecError), before any rank starts; the ranks check again (cluster nodes start them)."""
    from soho_scale.engine import checkpoint_store as store
    from soho_scale.engine import resume_check

    found = store.resume_point(job.checkpoint.dir, job.checkpoint.resume)
    manifest = store.read_manifest(found.location) if found else None
    if manifest is not None:
        resume_check.check(job, manifest, found.location)


def train_main(argv: list[str]) -> int:
    """`soho-scale train JOB [KEY=VALUE...] [--nproc N] [--run-dir DIR] [--master-port P]`."""
    parser = argparse.ArgumentParser(
        prog="soho-scale train",
        description="Train a job on N local ranks (CPU/gloo or GPU/NCCL).",
    )
    parser.add_argument("job")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--nproc", type=int, help="local ranks (default: resources.procs_per_node)")
    parser.add_argument("--run-dir", help="run folder (default: runs/<job name>)")
    parser.add_argument("--master-port", type=int)
    args = parser.parse_intermixed_args(argv)
    job = load_job(args.job, args.overrides)  # a bad spec fails here, before any process starts
    refuse_unsupported_patches()
    refuse_changed_resume(job)
    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    nproc = args.nproc or job.resources.procs_per_node
    accumulation_steps(job, nproc)  # the ranks would each fail on it after starting
    if args.master_port is None:
        from data_pipeline.loopback import free_port

        args.master_port = free_port()
    ranks = rank_args(args.job, args.overrides, args.run_dir)
    return run_node(ranks, 1, 0, nproc, "127.0.0.1", args.master_port, own_group=True)


# ---- soho-scale eval: its parent process imports no torch (it only validates and launches)


def eval_launcher_command(argv: list[str], nproc: int, master_port: int) -> list[str]:
    """torchrun for N local ranks, each running `python -m soho_scale.launch.rank eval ARGV`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(master_port),
        "-m",
        RANK_MODULE,
        "eval",
        *argv,
    ]


def eval_main(argv: list[str]) -> int:
    """`soho-scale eval JOB [KEY=VALUE...] --checkpoint CKPT [--nproc N] [--out DIR]`."""
    parser = eval_parser("soho-scale eval")
    parser.add_argument("--nproc", type=int, default=1, help="local ranks (default 1)")
    args = parser.parse_intermixed_args(argv)
    try:
        load_job(args.job, args.overrides)  # a bad spec fails here, before any process starts
    except SpecError as e:
        print(redact(f"error: {e}"), file=sys.stderr)
        return 2
    if args.nproc <= 1:
        return eval_rank(_without_nproc(argv))
    from data_pipeline.loopback import free_port

    return subprocess.call(eval_launcher_command(_without_nproc(argv), args.nproc, free_port()))


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out
