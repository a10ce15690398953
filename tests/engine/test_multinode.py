"""Two "nodes" on loopback: two DeepSpeed launchers with --no_ssh --node_rank 0/1 against
127.0.0.1 train one job together: one MLflow run, one committed checkpoint.

Node 1 runs with a private /dev/shm (a mount namespace), as a second host would have: streaming's
shared memory assumes one node per host, and two node leaders on one /dev/shm collide."""

import os
import shutil
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from data_pipeline.loopback import free_port
from soho_scale.engine.checkpoint_store import committed_checkpoints
from tests.engine.conftest import REPO

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _private_shm_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _private_shm_works(), reason="needs unshare -m (a private /dev/shm)")
def test_two_nodes_on_loopback_train_one_job(make_job, tmp_path):
    job = make_job("twonode", schedule__steps=2, checkpoint__interval_steps=1000)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    run_dir = tmp_path / "run"
    port = free_port()
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = []
    for node in (0, 1):
        command = [
            deepspeed, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
            "--num_nodes", "2", "--num_gpus", "1", "--master_addr", "127.0.0.1",
            "--master_port", str(port), "--module", "soho_scale.launch.rank", "train", job,
            "--run-dir", str(run_dir),
        ]  # fmt: skip
        if node == 1:
            launch = " ".join(f"'{part}'" for part in command)
            command = [
                "unshare",
                "-m",
                "sh",
                "-c",
                f"mount -t tmpfs tmpfs /dev/shm && exec {launch}",
            ]
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=log))
    codes = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "world_size=2" in logs[0] or "dist_world_size=2" in logs[0]
    found = committed_checkpoints(str(tmp_path / "twonode-ckpt"))
    assert [c.step for c in found] == [2]
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("soho-demo").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["derived.world_size"] == "2"


def _start_node(node: int, job: str, run_dir, port: int, log, *overrides: str):
    """One "node": the node launcher (soho_scale.launch.node) for 1 rank of 2. Node 1 runs in a
    mount namespace of its own where /dev/shm and the run folder are private tmpfs mounts: it
    sees none of node 0's files, as a second host without a shared filesystem would."""
    command = [
        sys.executable, "-m", "soho_scale.launch.node", "--nodes", "2", "--node-rank", str(node),
        "--procs", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), "--",
        "train", job, *overrides, "--run-dir", str(run_dir),
    ]  # fmt: skip
    if node == 1:
        launch = " ".join(f"'{part}'" for part in command)
        private = f"mount -t tmpfs tmpfs /dev/shm && mount -t tmpfs tmpfs '{run_dir}'"
        command = ["unshare", "-m", "sh", "-c", f"{private} && exec {launch}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=log)


@pytest.mark.skipif(not _private_shm_works(), reason="needs unshare -m (private mounts)")
def test_elastic_resume_on_two_nodes_that_share_no_folder(make_job, tmp_path):
    """A checkpoint of 1 rank in S3 resumes on 2 nodes x 1 rank: each node downloads it and
    converts it to DeepSpeed's universal format itself (node 1 cannot see node 0's copy)."""
    job = make_job(
        "elastic", schedule__steps=2, checkpoint__dir="s3://soho-test/ckpt-elastic",
        checkpoint__interval_steps=2,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    one = subprocess.run(
        [sys.executable, "-m", "soho_scale.cli", "train", job, "--nproc", "1",
         "--run-dir", str(run_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )  # fmt: skip
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    port = free_port()
    logs = [open(tmp_path / f"node{n}.log", "w") for n in (0, 1)]
    procs = [_start_node(n, job, run_dir, port, logs[n], "schedule.steps=3") for n in (0, 1)]
    codes = [p.wait(timeout=600) for p in procs]
    text = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], text[0][-3000:] + text[1][-3000:]
    # Rank 0 logs it; node 1 (warnings only) converted its own copy, or it could not have loaded.
    assert "checkpoint from 1 ranks, resuming on 2: converting to universal" in text[0]
    assert "resumed from s3://soho-test/ckpt-elastic/step_00000002 at step 2" in text[0]
    found = committed_checkpoints("s3://soho-test/ckpt-elastic")
    assert [c.step for c in found] == [2, 3]
