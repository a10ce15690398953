"""soho_scale.launch: the rank entry point, the one rank command line every launcher uses, and
the local launchers' commands (tests/test_layering.py keeps the package out of import cycles)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.patches import guard
from soho_scale.engine.patches.deepspeed_launcher import PATCH as LAUNCHER_PATCH
from soho_scale.launch import rank
from soho_scale.launch.hostfile import runner_command
from soho_scale.launch.local import eval_launcher_command, rank_processes, train_command
from soho_scale.spec import SpecError

ROOT = Path(__file__).resolve().parent.parent
JOB = "jobs/demo/pretrain.yaml"
OVERRIDES = ["optim.rest.lr=1e-4"]


def test_rank_module_args_is_what_every_launcher_runs():
    args = rank.rank_module_args(JOB, OVERRIDES, "runs/x")
    assert args == [
        "--module", "soho_scale.launch.rank", "train", JOB, *OVERRIDES, "--run-dir", "runs/x",
    ]  # fmt: skip
    assert rank.rank_module_args(JOB, [])[-2:] == ["train", JOB]
    assert train_command(JOB, OVERRIDES, 2, 29500, "runs/x")[-len(args) :] == args
    assert runner_command(JOB, OVERRIDES, 2, "runs/x", 29500)[-len(args) :] == args


def test_train_starts_the_runner_when_the_launcher_patch_is_off():
    name = LAUNCHER_PATCH.name
    try:
        guard.forget(name)
        direct = train_command(JOB, OVERRIDES, 2, 29500)
        assert direct[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.launch"]
        guard.set_decision(name, False)
        command = train_command(JOB, OVERRIDES, 2, 29500, "runs/x")
        assert command == runner_command(JOB, OVERRIDES, 2, "runs/x", 29500)
        assert Path(command[0]).name == "deepspeed"
        assert command[1:5] == ["--num_gpus", "2", "--master_port", "29500"]
    finally:
        guard.forget(name)


def test_eval_ranks_run_the_rank_module():
    command = eval_launcher_command([JOB, "--checkpoint", "c.pt"], 2, 29500)
    assert command[-5:] == ["soho_scale.launch.rank", "eval", JOB, "--checkpoint", "c.pt"]
    assert command[-6] == "-m" and "--nproc_per_node" in command


def test_rank_accepts_the_launchers_local_rank_before_the_command():
    # DeepSpeed's launcher runs `python -u -m MODULE --local_rank=N ARGS...`
    with pytest.raises(SpecError, match="no such job file"):
        rank.main(["--local_rank=1", "train", "missing.yaml", "a.b=1", "--run-dir", "r"])


def test_eval_rank_user_error_is_one_line_and_status_2(capsys):
    code = rank.main(["eval", "missing.yaml", "--checkpoint", "c.pt"])
    assert code == 2
    assert capsys.readouterr().err == "error: missing.yaml: no such job file\n"


def test_rank_processes_finds_the_rank_module_under_a_process():
    sleep = "import time; time.sleep(60)"
    children = [
        subprocess.Popen([sys.executable, "-c", sleep, "-m", "soho_scale.launch.rank", "train"]),
        subprocess.Popen([sys.executable, "-c", sleep, "-m", "soho_scale.evaluate"]),
    ]
    try:  # Popen returns once the child has exec'd: its command line is already the new one
        assert [process.pid for process in rank_processes(os.getpid())] == [children[0].pid]
    finally:
        for child in children:
            child.kill()
            child.wait()
