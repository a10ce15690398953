"""`soho-scale launch --scheduler slurm`: an sbatch script, one task per node.

Each task writes a hostfile of the allocation's nodes and runs DeepSpeed's runner with
`--no_ssh --node_rank $SLURM_NODEID` against node 0 as master; the ranks checkpoint on the
SIGTERM Slurm sends before the time limit. Non-secret settings are exported by value; credentials
come from the nodes' own environment or AWS chain.
"""

from __future__ import annotations

import os
import shlex
import sys

from soho_scale.launch.rank import rank_module_args
from soho_scale.spec import Job


def default_setup(workdir: str) -> list[str]:
    """Shell lines before the launch: running inside a venv that lives in the repo, activate the
    same one on the nodes."""
    if sys.prefix != sys.base_prefix:
        relative = os.path.relpath(sys.prefix, workdir)
        if not relative.startswith(".."):
            return [f"source {shlex.quote(os.path.join(relative, 'bin', 'activate'))}"]
    return []


def sbatch_script(
    job: Job,
    job_path: str,
    overrides: list[str],
    nodes: int,
    gpus: int,
    master_port: int,
    workdir: str,
    env: dict[str, str],
    run_dir: str | None = None,
    setup: list[str] | None = None,
    sbatch_options: dict[str, str] | None = None,
) -> str:
    """An sbatch script: one task per node, each running the DeepSpeed launcher without ssh."""
    node_args = shlex.join(rank_module_args(job_path, overrides, run_dir))
    # Each task writes its own hostfile (node-local TMPDIR): the runner needs one with --no_ssh.
    per_node = "\n".join(
        [
            'hostfile="${TMPDIR:-/tmp}/soho-hostfile-${SLURM_JOB_ID}-${SLURM_NODEID}"',
            f'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\\$/ slots={gpus}/" '
            '> "$hostfile"',
            f'exec deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID" '
            f'--num_nodes {nodes} --num_gpus {gpus} --master_addr "$MASTER_ADDR" '
            f"--master_port {master_port} {node_args}",
        ]
    )
    lines = [
        "#!/bin/bash",
        f"# soho-scale launch {job_path}: {nodes} node(s) x {gpus} GPUs, one task per node.",
        f"#SBATCH --job-name={job.name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus}",
        "#SBATCH --output=%x-%j.out",
        # Ranks checkpoint on SIGTERM and exit 75: two minutes before the time limit is enough.
        "#SBATCH --signal=TERM@120",
    ]
    lines += [f"#SBATCH --{k}={v}" for k, v in (sbatch_options or {}).items() if v]
    lines += ["set -euo pipefail", f"cd {shlex.quote(workdir)}"]
    lines += list(setup or [])
    lines.append("# Non-secret settings; credentials come from the nodes' environment / AWS chain.")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    # `sed -n 1p`, not `head -n 1`: head's early exit SIGPIPEs scontrol, and pipefail aborts.
    lines += [
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"',
        "export MASTER_ADDR",
        f"srun --nodes={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 "
        f"bash -c {shlex.quote(per_node)}",
    ]
    return "\n".join(lines) + "\n"
