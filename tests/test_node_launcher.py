"""`python -m soho_scale.launch.node`, the launcher on every cluster node (Slurm task, pod PID 1):
the ranks' environment, a stop signal waited out until the ranks' checkpoint is committed, and a
crashed rank taking the node down with its status."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from soho_scale.launch.node import node_status

REPO = Path(__file__).resolve().parent.parent


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftovers():
    """A failed test leaves no launcher or stand-in rank behind (each in its own group)."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_node(tmp_path: Path, mode: str, *argv: str) -> subprocess.Popen:
    """The node launcher in a subprocess, its ranks the stand-in (tests/node_rank_stand_in.py)."""
    code = (
        "import sys; from soho_scale.launch.node import run_node; "
        f"sys.exit(run_node(['{mode}', {str(tmp_path)!r}], {', '.join(argv)}, "
        "module='tests.node_rank_stand_in'))"
    )
    STARTED.append(subprocess.Popen([sys.executable, "-c", code], cwd=REPO, process_group=0))
    return STARTED[-1]


def wait_files(tmp_path: Path, names: list[str], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not all((tmp_path / n).exists() for n in names):
        assert time.time() < deadline, f"no {names} after {timeout} s"
        time.sleep(0.1)


def test_ranks_get_the_distributed_environment(tmp_path):
    proc = start_node(tmp_path, "env", "2", "1", "2", "'10.0.0.1'", "29600")  # node 1 of 2
    assert proc.wait(timeout=60) == 0
    for local, rank in ((0, 2), (1, 3)):
        env = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")} == {
            "RANK": str(rank),
            "LOCAL_RANK": str(local),
            "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2",
        }
        assert (env["CROSS_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == (
            "1",
            "10.0.0.1",
            "29600",
        )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_is_forwarded_and_the_checkpoint_waited_for(tmp_path, sig):
    proc = start_node(tmp_path, "save", "1", "0", "2", "'127.0.0.1'", "29601")
    wait_files(tmp_path, ["ready0", "ready1"])
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 75  # preempted: the scheduler requeues / restarts
    assert (tmp_path / "saved0").exists() and (tmp_path / "saved1").exists()


def _pid_namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _pid_namespaces_work(), reason="needs unshare --pid")
def test_as_pid_1_the_launcher_still_forwards_sigterm(tmp_path):
    """In a pod the launcher is PID 1, which the kernel sends no signal it has no handler for:
    in a PID namespace of its own, SIGTERM still reaches the ranks and their checkpoint."""
    code = (
        "import os, sys; from soho_scale.launch.node import run_node; assert os.getpid() == 1; "
        f"sys.exit(run_node(['save', {str(tmp_path)!r}], 1, 0, 2, '127.0.0.1', 29603, "
        "module='tests.node_rank_stand_in'))"
    )
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", code],
        cwd=REPO, process_group=0,
    )  # fmt: skip
    STARTED.append(proc)
    wait_files(tmp_path, ["ready0", "ready1"])
    (launcher,) = psutil.Process(proc.pid).children()  # PID 1 inside, as the kubelet sees it
    launcher.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    assert (tmp_path / "saved0").exists() and (tmp_path / "saved1").exists()


def test_a_crashed_rank_stops_the_others_and_fails_the_node(tmp_path):
    proc = start_node(tmp_path, "fail", "1", "0", "2", "'127.0.0.1'", "29602")
    started = time.time()
    assert proc.wait(timeout=60) == 3  # rank 1's status, not that of rank 0 it had to kill
    assert time.time() - started < 40  # the blocked rank was killed, not waited for


def test_node_status():
    assert node_status([0, 0]) == 0
    assert node_status([75, 75]) == 75
    assert node_status([75, 0]) == 75
    assert node_status([75, 1]) == 1
    assert node_status([-9, 0]) == 128 + 9
    assert node_status([-15, 75]) == 128 + 15
    # After a stop signal, a rank killed by SIGTERM before its handler was up is preempted too.
    assert node_status([-15, 75], stopping=True) == 75
    assert node_status([-9, 75], stopping=True) == 128 + 9
