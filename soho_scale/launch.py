"""From a job spec to running ranks.

`soho-scale train`: DeepSpeed's launcher for N local ranks, each running
`python -m soho_scale.train JOB [overrides] [--run-dir DIR]`. `soho-scale eval`: torchrun for
N local ranks, each running `python -m soho_scale.evaluate`; its parent imports neither torch
nor the model (~5 s per evaluation, measured: the ranks import them anyway). The spec is
validated before anything starts.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys

from soho_scale.spec import SpecError, load_job


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
    """The DeepSpeed runner (`deepspeed ...`): hostfiles, pdsh/openmpi/slurm (`soho-scale launch`)."""
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    cmd = [deepspeed, "--num_gpus", str(nproc)]
    if master_port:
        cmd += ["--master_port", str(master_port)]
    return cmd + list(extra or []) + _rank_module_args(job_path, overrides, run_dir)


def local_launcher_command(
    job_path: str, overrides: list[str], nproc: int, master_port: int, run_dir: str | None = None
) -> list[str]:
    """DeepSpeed's per-node launcher (`deepspeed.launcher.launch`) for N ranks on this machine:
    the command the `deepspeed` runner itself runs for one local node, without the runner's own
    start-up (~4 s importing DeepSpeed, measured) before it. `world_info` is encoded as the
    runner's `encode_world_info` does; importing it would import DeepSpeed here."""
    world_info = {"localhost": list(range(nproc))}
    encoded = base64.urlsafe_b64encode(json.dumps(world_info).encode()).decode()
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={encoded}"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={master_port}"]
    return cmd + _rank_module_args(job_path, overrides, run_dir)


def _rank_module_args(job_path: str, overrides: list[str], run_dir: str | None) -> list[str]:
    """What each rank runs, in the form both DeepSpeed launchers take it."""
    args = ["--module", "soho_scale.train", job_path, *overrides]
    return args + ["--run-dir", run_dir] if run_dir else args


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
    cmd = local_launcher_command(args.job, args.overrides, nproc, args.master_port, args.run_dir)
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


# ---- soho-scale eval: its parent process imports no torch (it only validates and launches)


def eval_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Evaluate a checkpoint on the job's eval.streams (N local ranks)."
    )
    parser.add_argument("job", help="job YAML file (its eval.streams, data and model sections)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--checkpoint", required=True, help="exported .pt or checkpoint folder/URL")
    parser.add_argument("--out", help="output folder (default: runs/<job>/eval/<split>)")
    parser.add_argument("--batch-size", type=int, help="per rank (default: micro_batch_per_rank)")
    return parser


def eval_launcher_command(argv: list[str], nproc: int, master_port: int) -> list[str]:
    """torchrun for N local ranks, each running `python -m soho_scale.evaluate ARGV`."""
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
        "soho_scale.evaluate",
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
        from soho_scale.evaluate import rank_main

        return rank_main(_without_nproc(argv))
    from data_pipeline.storage import free_port

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
