"""`soho-scale launch --scheduler slurm`: an sbatch script, one task per node, that survives
preemption.

Each task runs the node launcher (`soho_scale.launch.node`) for its node's ranks, node 0 as
master. What happens on a stop:
- Slurm sends SIGTERM to every task `save_grace_s` before the time limit (`--signal`), and on
  `scancel --signal=TERM`, `scontrol requeue` or preemption (PreemptMode=REQUEUE). The batch
  shell traps SIGTERM/SIGUSR1/SIGINT and passes them to srun (which forwards them to the tasks),
  then keeps waiting: the node launchers forward them to the ranks, which agree on a step,
  commit a checkpoint and exit 75, and wait out the save however long the scheduler allows.
- The step ending 75, the script requeues its own job (`scontrol requeue`; the job is
  `--requeue`-able) and the next start resumes from the committed checkpoint. Any other
  status is the job's.
Non-secret settings are exported by value; credentials come from the nodes' own environment or
AWS chain. Every user-supplied value is quoted or checked (`soho_scale.launch.errors`).
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

from soho_scale import PREEMPTED_EXIT_CODE
from soho_scale.launch.environment import credentialed
from soho_scale.launch.errors import checked, no_control_characters
from soho_scale.launch.node import NodeShape, node_command
from soho_scale.launch.rank import rank_args
from soho_scale.spec import Job


def default_setup(workdir: str) -> list[str]:
    """Shell lines before the launch: running inside a venv that lives in the repo, activate the
    same one on the nodes."""
    if sys.prefix != sys.base_prefix:
        relative = os.path.relpath(sys.prefix, workdir)
        if not relative.startswith(".."):
            return [f"source {shlex.quote(os.path.join(relative, 'bin', 'activate'))}"]
    return []


def slurm_options(args: Any, workdir: str) -> tuple[list[str], dict[str, str | None]]:
    """(set-up lines, #SBATCH choices) from the command line `launch` and `pipeline` share:
    `--setup` (default: activate this venv on the nodes), `--partition`, `--time`, `--account`."""
    setup = args.setup if args.setup is not None else default_setup(workdir)
    return setup, {"partition": args.partition, "time": args.time, "account": args.account}


def sbatch_options(
    name: str, shape: NodeShape, partition: str | None, time: str | None, account: str | None
) -> list[str]:
    """The `#SBATCH` lines: user values are checked, since quoting does not exist there."""
    lines = [
        f"--job-name={name}",  # job and stage names: the specs allow [A-Za-z0-9_.-] only
        f"--nodes={shape.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={shape.cpus}",
        f"--mem={shape.mem_gib}G" if shape.mem_gib else "--mem=0",
    ]
    if shape.gpus:
        lines.append(f"--gpus-per-node={shape.procs}")
    if shape.exclusive:
        lines.append("--exclusive")
    lines += [
        "--output=%x-%j.out",
        "--open-mode=append",  # a requeued run appends to the same log
        "--requeue",
        f"--signal=TERM@{shape.grace_s}",  # to every task, this long before the time limit
    ]
    for flag, value, kind in (
        ("partition", partition, "name"),
        ("time", time, "time"),
        ("account", account, "name"),
    ):
        if checked(f"--{flag}", value, kind):
            lines.append(f"--{flag}={value}")
    return [f"#SBATCH {line}" for line in lines]


# The batch shell. A stop signal that reaches it (scancel --batch/--full) goes on to srun as
# SIGUSR1, which srun forwards as it is (a SIGTERM to srun makes it SIGKILL the tasks); the node
# launchers turn it into SIGTERM for the ranks. `wait` returns early when a trapped signal comes,
# hence the loop; a repeated `wait` returns the step's own status. The node launchers report a
# preemption through the marker (node 0's, on this machine) and exit 0, so that srun does not
# kill the other nodes' tasks for a "bad" exit while they finish their checkpoint.
_RUN_STEP = """\
marker="${{TMPDIR:-/tmp}}/soho-preempted-$SLURM_JOB_ID"
rm -f "$marker"
export SOHO_PREEMPTED_MARKER="$marker"
step=""
stop=0
trap 'stop=1; echo "soho-scale: stop signal, ranks commit a checkpoint"; \
[ -n "$step" ] && kill -USR1 "$step" 2>/dev/null' TERM USR1 INT
srun --nodes={nodes} --ntasks-per-node=1 --cpus-per-task={cpus} --kill-on-bad-exit=1 \
bash -c {per_node} &
step=$!
if [ "$stop" = 1 ]; then kill -USR1 "$step" 2>/dev/null; fi
while :; do
  stop=0
  wait "$step"
  status=$?
  [ "$stop" = 1 ] || break
done
if [ "$status" -eq {preempted} ] || {{ [ "$status" -eq 0 ] && [ -e "$marker" ]; }}; then
  rm -f "$marker"
  echo "soho-scale: checkpoint committed; requeueing job $SLURM_JOB_ID"
  for try in 1 2 3 4 5; do
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    sleep 10
  done
  echo "soho-scale: scontrol requeue failed; resubmit to resume" >&2
  exit {preempted}
fi
{finish}
"""

# Without --master-port: one port per job (below Linux's ephemeral ports, 32768 up), so that
# jobs sharing a node do not collide.
JOB_PORT = '"$((20000 + SLURM_JOB_ID % 12000))"'


def script_head(
    comments: list[str],
    options: list[str],
    workdir: str,
    env: dict[str, str],
    setup: list[str] | None = None,
) -> list[str]:
    """The lines every sbatch script starts with: options, the repo, set-up and settings.

    A setting written here without the credentials its value holds in this environment
    (`environment.credentialed`) keeps the value the job inherits from sbatch's environment
    (Slurm passes the submitting shell's), credentials and all; the written one is taken only
    when it inherits none."""
    for line in comments:
        no_control_characters("a path in the script's header", line)
    keep_inherited = credentialed(dict(os.environ), env)
    return [
        "#!/bin/bash",
        *(f"# {line}" for line in comments),
        *options,
        "set -euo pipefail",
        f"cd {shlex.quote(workdir)}",
        *(setup or []),
        "# Non-secret settings; credentials come from the nodes' environment / AWS chain.",
        *(
            f'[ -n "${{{k}:-}}" ] || {k}={shlex.quote(v)}; export {k}'
            if k in keep_inherited
            else f"export {k}={shlex.quote(v)}"
            for k, v in env.items()
        ),
    ]


def sbatch_script(
    job: Job,
    job_path: str,
    overrides: list[str],
    shape: NodeShape,
    master_port: int | None,
    workdir: str,
    env: dict[str, str],
    run_dir: str | None = None,
    setup: list[str] | None = None,
    options: dict[str, str | None] | None = None,
    finish: str = 'exit "$status"',
) -> str:
    """An sbatch script: one task per node running the node launcher; requeues on 75. `finish`:
    the shell line run when the step ends otherwise (its status in $status)."""
    options = options or {}
    per_node = node_command(
        rank_args(job_path, overrides, run_dir),
        shape.nodes,
        shape.procs,
        '"$SLURM_NODEID"',
        '"$MASTER_ADDR"',
        str(master_port) if master_port else "$MASTER_PORT",
    )
    head = script_head(
        [
            f"soho-scale launch {shlex.quote(job_path)}: {shape.describe()}, one task per node.",
            "On SIGTERM (time limit, scancel --signal, preemption) the ranks commit a checkpoint",
            f"and exit {PREEMPTED_EXIT_CODE}; the job then requeues itself and resumes.",
        ],
        sbatch_options(
            job.name, shape, options.get("partition"), options.get("time"), options.get("account")
        ),
        workdir,
        env,
        setup,
    )
    lines = [
        *head,
        # Node 0 is the master, at the address Slurm itself reaches it by (NodeAddr; a node's
        # name need not resolve). `sed -n 1p`, not `head -n 1`: head's early exit SIGPIPEs
        # scontrol, and pipefail aborts.
        'MASTER_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"',
        'MASTER_ADDR="$(scontrol show node "$MASTER_NODE" | sed -n \'s/.*NodeAddr=\\([^ ]*\\).*/\\1/p\')"',
        'export MASTER_ADDR="${MASTER_ADDR:-$MASTER_NODE}"',
        *([] if master_port else [f"export MASTER_PORT={JOB_PORT}"]),
        'echo "soho-scale: job $SLURM_JOB_ID start ${SLURM_RESTART_COUNT:-0} on $MASTER_ADDR"',
        "set +e",
        _RUN_STEP.format(
            nodes=shape.nodes,
            per_node=shlex.quote(per_node),
            preempted=PREEMPTED_EXIT_CODE,
            finish=finish,
            cpus=shape.cpus,
        ),
    ]
    return "\n".join(lines)
