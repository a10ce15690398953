"""A real one-node Slurm cluster on loopback for tests: munged, slurmctld and slurmd (Debian's
`munge` and `slurm-wlm`), each started here with files in a private folder and stopped on exit.

Everything is private to the folder: munge's key and socket, slurm.conf (commands find it
through SLURM_CONF), state and spool folders, logs and free ports, so a cluster can run beside
another (or beside a system Slurm) without touching it. Daemons run as root (SlurmUser=root):
`skip_reason()` says why a machine cannot run one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from data_pipeline.loopback import free_port

NODE = "soho-node0"
DAEMONS = ("munged", "slurmctld", "slurmd")


def skip_reason() -> str | None:
    """Why a real Slurm cannot run here, or None."""
    missing = [tool for tool in (*DAEMONS, "sbatch", "scontrol") if shutil.which(tool) is None]
    if missing:
        return (
            f"needs Debian's slurm-wlm and munge ({', '.join(missing)} not found; "
            "`make test` installs them when run as root)"
        )
    if os.geteuid() != 0:
        return "the one-node Slurm test cluster runs its daemons as root"
    return None


def _conf(folder: Path, cpus: int, memory_mb: int) -> str:
    return "\n".join(
        [
            "ClusterName=soho-test",
            f"SlurmctldHost=localhost({'127.0.0.1'})",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire is also how long a requeued job waits before it may start (120 s).
            f"AuthInfo=socket={folder / 'munge.socket'},cred_expire=10",
            f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={folder / 'spool'}",
            f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={folder / 'slurmctld.log'}",
            f"SlurmdLogFile={folder / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroup hierarchy in a container: track a task's processes by parent id.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU_Memory",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=30",  # the default: SIGTERM, and SIGKILL 30 s later
            "MinJobAge=600",
            "SchedulerParameters=defer_batch",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            f"NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} "
            f"CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def _step_daemons() -> set[int]:
    import psutil

    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "slurmstepd"}


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


class SlurmCluster:
    """`with SlurmCluster(folder) as slurm:` a one-node cluster; `slurm.env` for its commands."""

    def __init__(self, folder: Path, cpus: int | None = None, memory_mb: int = 8192):
        self.folder = Path(folder)
        self.cpus = cpus or os.cpu_count() or 2
        self.memory_mb = memory_mb
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.folder / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._steps_before = _step_daemons()

    def __enter__(self) -> SlurmCluster:
        for sub in ("state", "spool", "munge"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        key = self.folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(_conf(self.folder, self.cpus, self.memory_mb))
        try:
            self._start(
                "munged",
                ["munged", "--foreground", "--force", f"--socket={self.folder / 'munge.socket'}"]
                + [f"--key-file={key}", f"--pid-file={self.folder / 'munge' / 'munged.pid'}"]
                + [f"--log-file={self.folder / 'munge' / 'munged.log'}"]
                + [f"--seed-file={self.folder / 'munge' / 'munged.seed'}"],
            )
            self._wait(lambda: (self.folder / "munge.socket").exists(), 30, "munged's socket")
            self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._start("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(self.conf)])
            self._wait(self._node_idle, 60, f"node {NODE} to be idle")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self._cancel_jobs()
        # slurmd's step daemons outlive it: stop the ones started while this cluster ran.
        for step in _step_daemons() - self._steps_before:
            _kill_tree(step)
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
        self.procs.clear()

    def _cancel_jobs(self) -> None:
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            self.run("scancel", "--full", *jobs, check=False)
        deadline = time.time() + 60
        while time.time() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
            time.sleep(1)

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.folder / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _wait(self, predicate, timeout: float, what: str) -> None:  # noqa: ANN001
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}): {self.logs(name)}")
            if predicate():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}: {self.logs()}")

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-n", NODE, "-o", "%T", check=False).stdout
        return out.strip() == "idle"

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm command against this cluster."""
        return subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=60, check=check
        )

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_job(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {self.job(job_id)}")

    def logs(self, *names: str) -> str:
        out = []
        for name in names or ("slurmctld", "slurmd", "munged"):
            for path in (self.folder / f"{name}.log", self.folder / f"{name}.stdout"):
                if path.exists():
                    out.append(f"--- {path.name}\n{path.read_text()[-3000:]}")
        return "\n".join(out)
