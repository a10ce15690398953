"""`soho-scale launch`: hostfile command and env file, sbatch script, Kubernetes manifest.

Secrets are planted in the environment of every test: none may reach a file or a command line.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from soho_scale.launch.submit import ClusterError, launch_main

REPO = Path(__file__).resolve().parent.parent
JOB = "jobs/demo/pretrain.yaml"  # global batch 32, micro batch 16
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-0123",
    "AWS_ACCESS_KEY_ID": "planted-aws-key-id-4567",
    "MLFLOW_TRACKING_TOKEN": "planted-mlflow-token-89",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no user ~/.deepspeed_env
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    for name in ("BACKOFF_FACTOR", "MAX_RETRIES", "TIMEOUT"):  # set by tracking in other tests
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://storage.internal:9000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    return monkeypatch


def assert_no_secret(text: str) -> None:
    for value in SECRETS.values():
        assert value not in text


def test_hostfile_dry_run_command_and_env_file(env, tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two workers\nworker-0 slots=2\nworker-1 slots=2\n")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".deepspeed_env").write_text("NCCL_IB_DISABLE=1\nMY_API_TOKEN=user-own-secret\n")
    run_dir = tmp_path / "run"
    argv = [JOB, "optim.rest.lr=1e-4", "--hostfile", str(hostfile), "--launcher", "openmpi"]
    argv += ["--nodes", "2", "--gpus-per-node", "1", "--run-dir", str(run_dir), "--dry-run"]
    assert launch_main(argv) == 0
    out = capsys.readouterr().out
    command = shlex.split(out.strip().splitlines()[-1])
    assert command[0].endswith("deepspeed")
    flags = dict(zip(command[1:-7:2], command[2:-7:2]))
    assert flags == {
        "--num_gpus": "1",
        "--master_port": "29500",
        "--hostfile": str(hostfile),
        "--launcher": "openmpi",
        "--num_nodes": "2",
    }
    assert command[-7:] == [
        "--module",
        "soho_scale.launch.rank",
        "train",
        JOB,
        "optim.rest.lr=1e-4",
        "--run-dir",
        str(run_dir),
    ]
    env_file = (run_dir / "deepspeed_env").read_text()
    # DeepSpeed's runner splits every line on "=": only KEY=VALUE lines.
    entries = dict(line.split("=", 1) for line in env_file.splitlines())
    assert entries == {
        "NCCL_IB_DISABLE": "1",
        "S3_ENDPOINT_URL": "http://storage.internal:9000",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
    }
    assert_no_secret(env_file + out)
    assert "user-own-secret" not in env_file + out
    assert "MLFLOW_TRACKING_TOKEN" in out  # told it is held back


@pytest.mark.slow
def test_deepspeed_runner_reads_env_file_and_drops_secrets(env, tmp_path, capsys):
    """The real DeepSpeed runner (pdsh path); pdsh and ssh are stand-ins that record the
    command each host would run."""
    shims = tmp_path / "bin"
    shims.mkdir()
    for tool in ("pdsh", "ssh"):
        (shims / tool).write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/{tool}.args"\n')
        (shims / tool).chmod(0o755)
    env.setenv("PATH", f"{shims}:{os.environ['PATH']}")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 slots=1\nworker-1 slots=1\n")
    argv = [JOB, "--hostfile", str(hostfile), "--gpus-per-node", "1", "--nodes", "2"]
    argv += ["--master-addr", "10.0.0.1", "--run-dir", str(tmp_path / "run")]
    assert launch_main(argv) == 0
    remote = (tmp_path / "pdsh.args").read_text()
    assert "-w worker-0,worker-1" in remote
    assert "export S3_ENDPOINT_URL=http://storage.internal:9000;" in remote
    assert "export MLFLOW_TRACKING_URI=http://mlflow.internal:5000;" in remote
    assert f"--module --enable_each_rank_log=None soho_scale.launch.rank train {JOB}" in remote
    assert_no_secret(remote)


def test_hostfile_with_too_few_hosts_is_a_user_error(env, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 slots=8\n")
    with pytest.raises(ClusterError, match="1 host"):
        launch_main([JOB, "--hostfile", str(hostfile), "--nodes", "2", "--gpus-per-node", "1"])
    hostfile.write_text("worker-0 slot=8\n")
    with pytest.raises(ClusterError, match="HOST slots=N"):
        launch_main([JOB, "--hostfile", str(hostfile), "--dry-run"])


def write_sbatch(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "job.sbatch"
    argv = [JOB, "tracking.run_name=it's mine", "--scheduler", "slurm", "--nodes", "2"]
    argv += ["--gpus-per-node", "4", "batch.global_batch=128", "--out", str(out), *extra]
    assert launch_main(argv) == 0
    return out


def test_sbatch_script_is_valid_bash_with_the_launch_lines(env, tmp_path):
    script = write_sbatch(tmp_path, "--partition", "gpu", "--time", "24:00:00")
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=24:00:00",
        f"cd {REPO}",
        "export S3_ENDPOINT_URL=http://storage.internal:9000",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"',
    ):
        assert line in text.splitlines()
    assert "srun --nodes=2 --ntasks-per-node=1" in text
    assert '--no_ssh --node_rank "$SLURM_NODEID" --num_nodes 2 --num_gpus 4' in text
    assert "--module soho_scale.launch.rank train jobs/demo/pretrain.yaml" in text
    assert_no_secret(text)


def test_sbatch_script_runs_one_launcher_per_node(env, tmp_path):
    """Run the script with stand-ins for scontrol, srun and deepspeed: each node's launcher
    gets its rank, node 0 as master, and a hostfile listing both nodes."""
    script = write_sbatch(tmp_path, "--setup", "true")
    shims = tmp_path / "bin"
    shims.mkdir()
    tools = {
        "scontrol": 'printf "gpu-a\\ngpu-b\\n"',
        # srun: drop its options, run the command once per node with that node's id
        "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\n'
        'for n in 0 1; do SLURM_NODEID=$n "$@" || exit 1; done',
        "deepspeed": 'log="$LOG/node$SLURM_NODEID"; printf "%q " "$@" > "$log.args"\n'
        'while [ $# -gt 0 ]; do [ "$1" = --hostfile ] && cp "$2" "$log.hosts"; shift; done',
    }
    for name, body in tools.items():
        (shims / name).write_text(f"#!/bin/bash\n{body}\n")
        (shims / name).chmod(0o755)
    logs = tmp_path / "logs"
    logs.mkdir()
    run_env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", LOG=str(logs))
    run_env.update(SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_ID="7", TMPDIR=str(tmp_path))
    subprocess.run(["bash", str(script)], check=True, env=run_env, timeout=60)
    for node in (0, 1):
        args = shlex.split((logs / f"node{node}.args").read_text())
        assert args[args.index("--node_rank") + 1] == str(node)
        assert args[args.index("--master_addr") + 1] == "gpu-a"
        assert args[-3:] == [JOB, "tracking.run_name=it's mine", "batch.global_batch=128"]
        assert (logs / f"node{node}.hosts").read_text() == "gpu-a slots=4\ngpu-b slots=4\n"


def test_k8s_manifest_indexed_job_headless_service_and_secret_references(env, tmp_path):
    out = tmp_path / "job.k8s.yaml"
    argv = [JOB, "--scheduler", "k8s", "--nodes", "2", "--gpus-per-node", "4", "--out", str(out)]
    argv += ["batch.global_batch=128", "--image", "registry.example/soho:1", "--shm-size", "32Gi"]
    assert launch_main(argv) == 0
    text = out.read_text()
    assert_no_secret(text)
    service, job = yaml.safe_load_all(text)
    name = "soho-demo-pretrain"
    assert service["kind"] == "Service" and service["metadata"]["name"] == name
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod = job["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert pod["spec"]["subdomain"] == name
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "registry.example/soho:1"
    assert container["workingDir"] == "/workspace"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 4}
    (volume,) = pod["spec"]["volumes"]
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert {"name": volume["name"], "mountPath": "/dev/shm"} in container["volumeMounts"]
    variables = {v["name"]: v for v in container["env"]}
    assert variables["S3_ENDPOINT_URL"]["value"] == "http://storage.internal:9000"
    for key, secret in (
        ("AWS_ACCESS_KEY_ID", "soho-s3"),
        ("AWS_SECRET_ACCESS_KEY", "soho-s3"),
        ("MLFLOW_TRACKING_TOKEN", "soho-mlflow"),
    ):
        assert "value" not in variables[key]
        reference = variables[key]["valueFrom"]["secretKeyRef"]
        assert (reference["name"], reference["key"]) == (secret, key)
    script = container["command"][-1]
    subprocess.run(["bash", "-n", "-c", script], check=True)
    assert '--node_rank "$JOB_COMPLETION_INDEX"' in script
    assert f"--master_addr {name}-0.{name}" in script
    assert (
        "--module soho_scale.launch.rank train jobs/demo/pretrain.yaml batch.global_batch=128"
        in script
    )


def test_k8s_job_file_outside_the_repo_is_a_user_error(env, tmp_path):
    outside = tmp_path / "job.yaml"
    outside.write_text((REPO / JOB).read_text())
    with pytest.raises(ClusterError, match="inside the repo"):
        launch_main([str(outside), "--scheduler", "k8s", "--out", str(tmp_path / "m.yaml")])
