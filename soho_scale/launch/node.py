"""The per-node launcher: `python -m soho_scale.launch.node`, and `soho-scale train`'s.

One runs on every node of a Slurm allocation (one srun task per node), as PID 1 of every
Kubernetes pod, and in `soho-scale train` for its local ranks. It starts the node's training
ranks (`python -m soho_scale.launch.rank train ...`) with the environment torch.distributed and
DeepSpeed read (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE/LOCAL_SIZE, CROSS_RANK/CROSS_SIZE,
MASTER_ADDR, MASTER_PORT), and then:
- SIGTERM, SIGINT or SIGUSR1 (a scheduler's preemption or time-limit warning) goes to every rank
  as SIGTERM, and the launcher waits for them however long they take: the ranks agree on a step,
  commit a checkpoint and exit with PREEMPTED_EXIT_CODE. Only the scheduler's own SIGKILL, after
  the grace it gives (Slurm's KillWait / `--signal` lead, the pod's
  terminationGracePeriodSeconds), ends the wait. DeepSpeed's launcher is not used here: it
  kills its ranks 30 s after its own SIGTERM, which a large model's save can outlast.
- A rank that fails (any other exit) leaves the others blocked in collectives: they are stopped
  (SIGTERM, SIGKILL after FAILURE_GRACE_S) and the node exits with the failed rank's status.
The node's exit status is 0 when every rank finished, PREEMPTED_EXIT_CODE when they stopped
on a signal with a committed checkpoint (Slurm requeues, Kubernetes restarts the pod), or the
first failure's status. It imports neither torch nor DeepSpeed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from soho_scale import PREEMPTED_EXIT_CODE
from soho_scale.engine.stop import SIGNALS as STOP_SIGNALS
from soho_scale.engine.stop import STOP_REQUESTED
from soho_scale.launch.rank import RANK_MODULE

if TYPE_CHECKING:
    from soho_scale.spec import Job

FAILURE_GRACE_S = 10.0
PREEMPTED_MARKER = "SOHO_PREEMPTED_MARKER"  # set by the sbatch script


@dataclass(frozen=True)
class NodeShape:
    """What each node runs and asks its scheduler for."""

    nodes: int
    procs: int  # ranks per node: GPUs, or CPU processes when `gpus` is False
    gpus: bool
    cpus: int
    mem_gib: int | None  # None: all of the node's memory (Slurm), no request (Kubernetes)
    exclusive: bool
    grace_s: int  # a rank's time from SIGTERM to a committed checkpoint

    @classmethod
    def of(cls, job: Job, nodes: int, procs: int, gpus: bool) -> NodeShape:
        res = job.resources
        return cls(
            nodes=nodes,
            procs=procs,
            gpus=gpus,
            cpus=res.cpus_per_node or procs * (job.data.workers + 1),
            mem_gib=res.mem_gib_per_node,
            exclusive=res.exclusive,
            grace_s=job.checkpoint.save_grace_s,
        )

    def describe(self) -> str:
        return f"{self.nodes} node(s) x {self.procs} {'GPU' if self.gpus else 'CPU'} rank(s)"


def node_command(
    rank_args: list[str], nodes: int, procs: int, node_rank: str, master: str, port: str
) -> str:
    """The shell line a node runs: `exec python -m soho_scale.launch.node ...`, the launcher
    replacing the shell so that it receives the scheduler's signals itself (PID 1 in a pod).
    `node_rank`, `master` and `port` are shell words of the caller's (e.g. "$SLURM_NODEID");
    every other argument is quoted."""
    fixed = ["--nodes", str(nodes), "--procs", str(procs)]
    return (
        f"exec python -m {__name__} {shlex.join(fixed)} --node-rank {node_rank} "
        f"--master-addr {master} --master-port {port} -- {shlex.join(rank_args)}"
    )


def rank_environment(
    environ: dict[str, str], nodes: int, node_rank: int, procs: int, local_rank: int, master: str,
    port: int,
) -> dict[str, str]:  # fmt: skip
    """One rank's environment: the variables torchrun and DeepSpeed's launcher set."""
    return {
        **environ,
        "RANK": str(node_rank * procs + local_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(nodes * procs),
        "LOCAL_WORLD_SIZE": str(procs),
        "LOCAL_SIZE": str(procs),
        "CROSS_RANK": str(node_rank),
        "CROSS_SIZE": str(nodes),
        "MASTER_ADDR": master,
        "MASTER_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    }


def node_status(codes: list[int], stopping: bool = False) -> int:
    """The node's exit status from its ranks' (negative: killed by that signal). After a stop
    signal, a rank that died of SIGTERM before it could catch it (while starting) still counts
    as preempted: the last committed checkpoint is intact and the relaunch resumes from it."""
    stopped = (0, PREEMPTED_EXIT_CODE, -signal.SIGTERM) if stopping else (0, PREEMPTED_EXIT_CODE)
    failed = [c for c in codes if c not in stopped]
    if failed:
        return 128 - failed[0] if failed[0] < 0 else failed[0]
    return PREEMPTED_EXIT_CODE if any(c != 0 for c in codes) else 0


def run_node(
    rank_args: list[str], nodes: int, node_rank: int, procs: int, master: str, port: int,
    module: str = RANK_MODULE, environ: dict[str, str] | None = None, own_group: bool = False,
) -> int:  # fmt: skip
    """Start this node's `procs` ranks (`python -m module RANK_ARGS`, in `environ`, default
    this process's), forward stop signals to them, return the node's status. `own_group`: the
    ranks in a process group of their own (`soho-scale train` in a terminal: Ctrl-C reaches the
    launcher, which passes it on, not the ranks' helper processes)."""
    if not 0 <= node_rank < nodes:
        raise ValueError(f"node rank {node_rank} is outside 0..{nodes - 1}")
    ranks: list[subprocess.Popen] = []
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        print(f"node {node_rank}: {signal.Signals(signum).name}, ranks checkpoint", flush=True)
        for proc in ranks:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        for local_rank in range(procs):
            env = rank_environment(
                dict(os.environ if environ is None else environ), nodes, node_rank, procs,
                local_rank, master, port,
            )  # fmt: skip
            if stopping:  # a rank started after the signal starts with its stop requested
                env[STOP_REQUESTED] = "1"
            command = [sys.executable, "-u", "-m", module, *rank_args]
            ranks.append(subprocess.Popen(command, env=env, process_group=0 if own_group else None))
        first_failure = _wait(ranks)
        codes = [proc.wait() for proc in ranks]
        status = first_failure if first_failure is not None else node_status(codes, stopping)
        return _report_preemption(status, node_rank)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _report_preemption(status: int, node_rank: int) -> int:
    """Under a Slurm script (SOHO_PREEMPTED_MARKER set), a preempted node exits 0 and node 0
    leaves the marker for the batch shell: srun kills every task when one exits non-zero, and
    other nodes may still be finishing after the checkpoint's commit."""
    marker = os.environ.get(PREEMPTED_MARKER)
    if status != PREEMPTED_EXIT_CODE or not marker:
        return status
    if node_rank == 0:
        with open(marker, "w") as f:
            f.write("checkpoint committed\n")
    return 0


def _wait(ranks: list[subprocess.Popen]) -> int | None:
    """Wait for every rank; on the first failure, stop the others and return its status."""
    while True:
        codes = [proc.poll() for proc in ranks]  # None: still running
        for code in codes:
            if code is not None and code not in (0, PREEMPTED_EXIT_CODE, -signal.SIGTERM):
                _stop(ranks)
                return node_status([code])
        if None not in codes:
            return None
        time.sleep(0.2)


def _stop(ranks: list[subprocess.Popen]) -> None:
    for proc in ranks:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + FAILURE_GRACE_S
    for proc in ranks:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__name__}",
        description="Start one node's training ranks; forward preemption signals to them.",
    )
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--node-rank", type=int, required=True)
    parser.add_argument("--procs", type=int, required=True, help="ranks on this node")
    parser.add_argument("--master-addr", required=True)
    parser.add_argument("--master-port", type=int, required=True)
    parser.add_argument("rank_args", nargs=argparse.REMAINDER, help="train JOB [K=V ...]")
    args = parser.parse_args(argv)
    rank_args = args.rank_args[1:] if args.rank_args[:1] == ["--"] else args.rank_args
    return run_node(
        rank_args, args.nodes, args.node_rank, args.procs, args.master_addr, args.master_port
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
