"""`soho-scale launch --scheduler slurm --submit` against a real Slurm: Debian's slurm-wlm and
munge, one slurmctld + slurmd on loopback (tests/slurm_cluster.py). A CPU job runs to its end; a
second one is stopped mid-training with `scancel --signal=TERM`, commits a checkpoint, requeues
itself, resumes and ends with the uninterrupted run's losses."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys

import pytest
import torch

from soho_scale.launch.submit import launch_main
from tests.engine.conftest import record, wait_for_steps

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def submit(slurm, job: str, run_dir: str, *overrides: str, monkeypatch, capsys) -> str:
    """`soho-scale launch JOB --scheduler slurm --cpu --submit`; returns the Slurm job id."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    monkeypatch.chdir(os.path.dirname(job))  # sbatch writes the job's log where it is run
    workdir = os.path.dirname(job)
    argv = [job, "tracking.record_samples=true", *overrides, "--scheduler", "slurm", "--cpu"]
    argv += ["--procs-per-node", "1", "--workdir", workdir, "--run-dir", run_dir]
    argv += ["--setup", f"source {shlex.quote(sys.prefix)}/bin/activate"]
    argv += ["--out", os.path.join(workdir, os.path.basename(run_dir) + ".sbatch"), "--submit"]
    capsys.readouterr()
    assert launch_main(argv) == 0
    out = capsys.readouterr().out
    match = re.search(r"Submitted batch job (\d+)", out)
    assert match, out
    return match.group(1)


def job_log(workdir: str, name: str, job_id: str) -> str:
    path = os.path.join(workdir, f"{name}-{job_id}.out")
    return open(path).read() if os.path.exists(path) else "(no log)"


def test_preempted_job_requeues_resumes_and_matches_the_uninterrupted_run(
    slurm, make_job, tmp_path, monkeypatch, capsys
):
    job = make_job("slurmjob", schedule__steps=8, checkpoint__interval_steps=100)
    full_dir, preempted_dir = str(tmp_path / "full"), str(tmp_path / "preempted")

    full = submit(slurm, job, full_dir, monkeypatch=monkeypatch, capsys=capsys)
    info = slurm.wait_job(full, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
    assert info["JobState"] == "COMPLETED", job_log(str(tmp_path), "slurmjob", full)

    overrides = [f"checkpoint.dir={tmp_path / 'ckpt-preempted'}"]
    job_id = submit(slurm, job, preempted_dir, *overrides, monkeypatch=monkeypatch, capsys=capsys)
    wait_for_steps(preempted_dir, 3)
    slurm.run("scancel", "--signal=TERM", job_id)
    info = slurm.wait_job(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
    log = job_log(str(tmp_path), "slurmjob", job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log + slurm.logs()
    assert "requeueing job" in log
    stopped = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert 3 <= stopped < 8
    uninterrupted = record(full_dir, 0, 0)
    resumed = record(preempted_dir, 0, stopped)
    torch.testing.assert_close(
        resumed["losses"], uninterrupted["losses"][stopped:], rtol=1e-6, atol=1e-6
    )


def test_slurm_initiated_requeue_resumes_from_the_committed_checkpoint(
    slurm, make_job, tmp_path, monkeypatch, capsys
):
    """`scontrol requeue`: what Slurm's own preemption (PreemptMode=REQUEUE) does. Slurm signals
    the batch shell and every task, SIGKILLs what is left KillWait (30 s) later and requeues the
    job; the ranks commit a checkpoint in time and the next start resumes from it."""
    job = make_job("slurmrequeue", schedule__steps=8, checkpoint__interval_steps=100)
    run_dir = str(tmp_path / "run")
    job_id = submit(slurm, job, run_dir, monkeypatch=monkeypatch, capsys=capsys)
    wait_for_steps(run_dir, 2)
    slurm.run("scontrol", "requeue", job_id)
    info = slurm.wait_job(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600)
    log = job_log(str(tmp_path), "slurmrequeue", job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log + slurm.logs()
    stopped = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert 2 <= stopped < 8
    assert json.loads(open(os.path.join(run_dir, "summary.json")).read())["steps"] == 8
