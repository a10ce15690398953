"""`soho-scale launch --hostfile FILE`: DeepSpeed's runner across the hosts of a hostfile.

The runner reaches the hosts through pdsh (or `--launcher openmpi|mvapich|slurm|mpich|impi`) and
starts DeepSpeed's per-node launcher on each; the repo and its venv must be at the same path on
every host. Non-secret settings travel in the runner's env file (`soho_scale.launch.environment`);
credentials come from each host's own environment. `runner_command` is the public `deepspeed`
runner command.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from soho_scale.engine.patches import deepspeed_runner_env
from soho_scale.launch.environment import deepspeed_env, launcher_environment, write_env_file
from soho_scale.launch.errors import ClusterError
from soho_scale.launch.rank import rank_module_args
from soho_scale.secrets import redact
from soho_scale.spec import Job, accumulation_steps


def runner_command(
    job_path: str,
    overrides: list[str],
    nproc: int,
    run_dir: str | None = None,
    master_port: int | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The DeepSpeed runner (`deepspeed ...`) starting `nproc` training ranks per node; `extra`:
    its hostfile and launcher options."""
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    cmd = [deepspeed, "--num_gpus", str(nproc)]
    if master_port:
        cmd += ["--master_port", str(master_port)]
    return cmd + list(extra or []) + rank_module_args(job_path, overrides, run_dir)


# Read by a POSIX shell even inside the double quotes pdsh's runner adds around an argument that
# holds a space (or, without them, as command separators and redirections).
_SHELL_SPECIAL = re.compile(r"[\"'`$\\;&|<>()\x00-\x1f\x7f]")


def shell_safe(arg: str) -> None:
    """Refuse `arg` unless it reaches every host as it is: DeepSpeed's pdsh runner passes the ranks'
    arguments to each host's shell as text, quoting only those with a space, so a quote, `$`,
    a backslash or a separator would be read there (a pipeline's quoted "010" arrives as the
    number 10)."""
    if _SHELL_SPECIAL.search(arg):
        raise ClusterError(
            f"{redact(arg)!r}: the pdsh launcher hands it to each host's shell, which would read "
            "its quotes, $, \\, ;, &, |, <, > or parentheses; write it without them or use "
            "--launcher openmpi"
        )


def read_hostfile(path: str) -> dict[str, int]:
    """`host slots=N` lines (MPI style, # comments) -> {host: slots}."""
    if not os.path.isfile(path):
        raise ClusterError(f"{path}: hostfile not found (lines like `worker-0 slots=8`)")
    # DeepSpeed's runner reads the same file: refused here is what it would misread there
    # (a byte-order mark becomes part of the first host's name).
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ClusterError(f"{path}: not a readable UTF-8 hostfile ({e})") from None
    if text.startswith("\ufeff"):
        raise ClusterError(f"{path}: starts with a byte-order mark; save it as plain UTF-8")
    hosts: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d{1,6})", line)
        if not match:
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise ClusterError(f"{path}:{number}: expected `HOST slots=N`, got {shown!r}")
        if match.group(1) in hosts:
            raise ClusterError(f"{path}:{number}: host {match.group(1)} listed twice")
        hosts[match.group(1)] = int(match.group(2))
    if not hosts:
        raise ClusterError(f"{path}: no hosts listed")
    return hosts


def hostfile_launch(args: argparse.Namespace, job: Job) -> int:
    """Check the hostfile against the job, write the env file, then run the runner (or, with
    --dry-run, print its command)."""
    hosts = read_hostfile(args.hostfile)
    nodes = args.nodes or job.resources.nodes
    gpus = args.gpus_per_node or job.resources.procs_per_node
    accumulation_steps(job, nodes * gpus)
    if len(hosts) < nodes:
        raise ClusterError(f"{args.hostfile}: {len(hosts)} host(s) listed, the job needs {nodes}")
    short = [h for h in list(hosts)[:nodes] if hosts[h] < gpus]
    if short:
        raise ClusterError(
            f"{args.hostfile}: {', '.join(short)} have fewer than {gpus} slots; "
            "lower --gpus-per-node or fix the hostfile"
        )
    extra = ["--hostfile", args.hostfile, "--launcher", args.launcher, "--num_nodes", str(nodes)]
    if args.launcher_args:
        extra += ["--launcher_args", args.launcher_args]
    if args.master_addr:
        extra += ["--master_addr", args.master_addr]
    if args.launcher == "pdsh":
        for arg in rank_module_args(args.job, args.overrides, args.run_dir):
            shell_safe(arg)
    cmd = runner_command(
        args.job, args.overrides, gpus, args.run_dir, args.master_port, extra=extra
    )
    # The env file and the runner's environment follow the runner's formats: refuse (one line)
    # before writing or starting anything when this DeepSpeed may not read them that way.
    deepspeed_runner_env.install()
    env_file = args.env_file or os.path.join(args.run_dir or f"runs/{job.name}", "deepspeed_env")
    values, notes = deepspeed_env(dict(os.environ))
    write_env_file(env_file, values)
    env, removed = launcher_environment(dict(os.environ), env_file)
    print(f"env file {os.path.abspath(env_file)} (DS_ENV_FILE) propagates to every host:")
    for name, value in values.items():
        print(redact(f"  {name}={value}"))
    for note in notes:
        print(f"  note: {note}")
    if removed:
        print(f"  kept off the runner's command lines: {', '.join(removed)}")
    print("  credentials: each host's own environment / AWS chain (never written here)")
    print(redact(shlex.join(cmd)))
    if args.dry_run:
        return 0
    return subprocess.call(cmd, env=env)
