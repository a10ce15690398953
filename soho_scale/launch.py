"""From a job spec to running ranks.

`soho-scale train`: the DeepSpeed launcher for N local ranks, each running
`python -m soho_scale.train JOB [overrides] [--run-dir DIR]`. The spec is validated before
anything starts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from soho_scale.spec import load_job


def _ensure_cpu_accelerator(env: dict[str, str]) -> None:
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")


def rank_main(argv: list[str]) -> int:
    """One rank: load the job (overrides applied and recorded) and train."""
    from soho_scale.engine.trainer import train

    parser = argparse.ArgumentParser(prog="python -m soho_scale.train")
    parser.add_argument("job")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--run-dir")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_intermixed_args(argv)
    job = load_job(args.job, args.overrides)
    train(job, args.run_dir)
    return 0


def launcher_command(
    job_path: str,
    overrides: list[str],
    nproc: int,
    run_dir: str | None = None,
    master_port: int | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    cmd = [deepspeed, "--num_gpus", str(nproc)]
    if master_port:
        cmd += ["--master_port", str(master_port)]
    cmd += list(extra or [])
    cmd += ["--module", "soho_scale.train", job_path, *overrides]
    if run_dir:
        cmd += ["--run-dir", run_dir]
    return cmd


def train_main(argv: list[str]) -> int:
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
    nproc = args.nproc or job.resources.procs_per_node
    env = dict(os.environ)
    _ensure_cpu_accelerator(env)
    if args.master_port is None:
        from data_pipeline.storage import free_port

        args.master_port = free_port()
    cmd = launcher_command(args.job, args.overrides, nproc, args.run_dir, args.master_port)
    return run_forwarding_signals(cmd, env)


def rank_processes(pid: int) -> list:
    """The rank processes (`python -m soho_scale.train`) under process `pid`."""
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if any(a == "-m" and b == "soho_scale.train" for a, b in zip(argv, argv[1:])):
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
