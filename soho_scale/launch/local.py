"""From a job spec to ranks on this machine: `soho-scale train` and `soho-scale eval`.

`soho-scale train`: DeepSpeed's per-node launcher for N local ranks, each running
`python -m soho_scale.launch.rank train JOB [overrides] [--run-dir DIR]`, started directly
(`soho_scale.engine.patches.deepspeed_launcher`) or, when that patch is off, through the
`deepspeed` runner; SIGTERM/SIGINT go to the ranks, which checkpoint and exit.
`soho-scale eval`: torchrun for N local ranks, each running
`python -m soho_scale.launch.rank eval ...`, or the evaluation in this process for one rank.
The spec is validated before anything starts. The parent imports neither DeepSpeed nor the
model, and `eval` no torch either: the ranks import them anyway, so the parent's imports would
only add start-up time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from soho_scale.engine.patches import deepspeed_launcher
from soho_scale.launch.hostfile import runner_command
from soho_scale.launch.rank import RANK_MODULE, eval_parser, eval_rank, rank_module_args
from soho_scale.spec import SpecError, load_job


def _ensure_cpu_accelerator(env: dict[str, str]) -> None:
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")


def refuse_unsupported_patches() -> None:
    """A correctness patch the ranks would install that cannot vouch for the installed library
    refuses here, with one line (PatchError), before any rank starts."""
    from data_pipeline.patches import streaming_shard_state

    streaming_shard_state.install()


def train_main(argv: list[str]) -> int:
    """`soho-scale train JOB [KEY=VALUE...] [--nproc N] [--run-dir DIR] [--master-port P]`."""
    parser = argparse.ArgumentParser(
        prog="soho-scale train",
        description="Train a job on N local ranks (DeepSpeed launcher; CPU/gloo or GPU/NCCL).",
    )
    parser.add_argument("job")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--nproc", type=int, help="local ranks (default: resources.procs_per_node)")
    parser.add_argument("--run-dir", help="run folder (default: runs/<job name>)")
    parser.add_argument("--master-port", type=int)
    args = parser.parse_intermixed_args(argv)
    job = load_job(args.job, args.overrides)  # a bad spec fails here, before any process starts
    refuse_unsupported_patches()
    nproc = args.nproc or job.resources.procs_per_node
    env = dict(os.environ)
    _ensure_cpu_accelerator(env)
    if args.master_port is None:
        from data_pipeline.loopback import free_port

        args.master_port = free_port()
    cmd = train_command(args.job, args.overrides, nproc, args.master_port, args.run_dir)
    return run_forwarding_signals(cmd, env)


def train_command(
    job_path: str, overrides: list[str], nproc: int, master_port: int, run_dir: str | None = None
) -> list[str]:
    """DeepSpeed's per-node launcher for `nproc` local training ranks, started directly
    (`deepspeed_launcher` patch on) or through the `deepspeed` runner (patch off)."""
    if deepspeed_launcher.install():
        rank_args = rank_module_args(job_path, overrides, run_dir)
        return deepspeed_launcher.local_launcher_command(nproc, master_port, rank_args)
    return runner_command(job_path, overrides, nproc, run_dir, master_port)


def rank_processes(pid: int) -> list:
    """The rank processes (`python -m soho_scale.launch.rank ...`) under process `pid`."""
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if any(a == "-m" and b == RANK_MODULE for a, b in zip(argv, argv[1:])):
            found.append(child)
    return found


def run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher; SIGTERM/SIGINT go to the ranks themselves, which checkpoint and exit
    with PREEMPTED_EXIT_CODE (the DeepSpeed launcher, signalled directly, would kill them after
    30 s). The launcher runs in its own session so a terminal's Ctrl-C reaches only us."""
    import signal

    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, frame) -> None:  # noqa: ANN001
        for rank in rank_processes(proc.pid):
            try:
                rank.send_signal(signal.SIGTERM)  # its DataLoader workers ignore it
            except Exception:  # noqa: BLE001 - a rank that just exited
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                forward(signal.SIGINT, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
        print(f"error: {e}", file=sys.stderr)
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
