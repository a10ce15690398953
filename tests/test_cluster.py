"""`soho-scale launch`: hostfile command and env file, sbatch script, Kubernetes manifest.

Secrets are planted in the environment of every test: none may reach a file or a command line.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from soho_scale.launch.submit import ClusterError, launch_main
from soho_scale.spec import SpecError

REPO = Path(__file__).resolve().parent.parent
JOB = "jobs/demo/pretrain.yaml"  # global batch 32, micro batch 16
# The oldest and newest Kubernetes the manifests are checked against (podFailurePolicy: 1.26+).
K8S_VERSIONS = ("1.27.0", "1.37.0")
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
    # what DeepSpeed's runner, reading the same file, would misread
    for content, said in ((b"\xef\xbb\xbfworker-0 slots=8\n", "byte-order mark"),
                          (b"worker-\xff slots=8\n", "not a readable UTF-8 hostfile"),
                          (b"worker-0 slots=" + b"9" * 5000 + b"\n", "HOST slots=N")):  # fmt: skip
        hostfile.write_bytes(content)
        with pytest.raises(ClusterError, match=said) as info:
            launch_main([JOB, "--hostfile", str(hostfile), "--dry-run"])
        assert len(str(info.value)) < 300
    with pytest.raises(SystemExit):  # argparse: not one of the runner's launchers
        launch_main([JOB, "--hostfile", str(hostfile), "--launcher", "bogus", "--dry-run"])


def test_pdsh_refuses_an_argument_each_hosts_shell_would_change(env, tmp_path, capsys):
    """DeepSpeed's pdsh runner hands the ranks' arguments to each host's shell as text, quoting
    only those with a space: a quoted value (a pipeline's experiment "010") would arrive as the
    number 10, `$(...)` would run. OpenMPI's runner passes them as a list."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 slots=8\n")
    argv = ["--hostfile", str(hostfile), "--gpus-per-node", "1", "--dry-run",
            "--env-file", str(tmp_path / "env"), "--run-dir", str(tmp_path / "run")]  # fmt: skip
    for override in (
        'tracking.experiment="010"',
        "tracking.run_name=a$(id)",
        "tracking.tags.x=a;b",
    ):
        with pytest.raises(ClusterError, match="pdsh launcher hands it to each host's shell"):
            launch_main([JOB, override, *argv])
    assert launch_main([JOB, 'tracking.experiment="010"', *argv, "--launcher", "openmpi"]) == 0
    assert launch_main([JOB, "eval.retrieval_k=8", "tracking.run_name=a b", *argv]) == 0


def write_sbatch(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "job.sbatch"
    argv = [JOB, "tracking.run_name=it's mine", "--scheduler", "slurm", "--nodes", "2"]
    argv += ["--gpus-per-node", "4", "batch.global_batch=128", "--out", str(out), *extra]
    assert launch_main(argv) == 0
    return out


def test_sbatch_script_is_valid_bash_with_the_launch_lines(env, tmp_path):
    env.setenv("NCCL_SOCKET_IFNAME", "ib0")
    env.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    env.setenv("NCCL_API_TOKEN", "planted-nccl-token-31")  # a secret by its name: held back
    script = write_sbatch(tmp_path, "--partition", "gpu", "--time", "24:00:00")
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    lines = text.splitlines()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=8",  # 4 ranks x (1 loader worker + 1)
        "#SBATCH --mem=0",
        "#SBATCH --exclusive",
        "#SBATCH --requeue",
        "#SBATCH --signal=TERM@180",
        "#SBATCH --open-mode=append",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=24:00:00",
        f"cd {REPO}",
        "export S3_ENDPOINT_URL=http://storage.internal:9000",
        "export NCCL_SOCKET_IFNAME=ib0",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
    ):
        assert line in lines
    assert "srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=8 " in text
    node = shlex.split(text.split("bash -c ", 1)[1].split(" &\n")[0])[0]
    assert node.startswith("exec python -m soho_scale.launch.node --nodes 2 --procs 4 ")
    assert '--node-rank "$SLURM_NODEID" --master-addr "$MASTER_ADDR"' in node
    assert shlex.split(node.split(" -- ", 1)[1]) == [
        "train", JOB, "tracking.run_name=it's mine", "batch.global_batch=128"
    ]  # fmt: skip
    assert_no_secret(text)
    assert "planted-nccl-token-31" not in text


def test_sbatch_cpu_mode_and_resources_from_the_spec(env, tmp_path):
    out = tmp_path / "cpu.sbatch"
    argv = [JOB, "resources.cpus_per_node=6", "resources.mem_gib_per_node=32"]
    argv += ["resources.exclusive=false", "checkpoint.save_grace_s=600", "--scheduler", "slurm"]
    argv += ["--cpu", "--procs-per-node", "2", "--out", str(out)]
    assert launch_main(argv) == 0
    lines = out.read_text().splitlines()
    for line in ("#SBATCH --cpus-per-task=6", "#SBATCH --mem=32G", "#SBATCH --signal=TERM@600"):
        assert line in lines
    assert "export DS_ACCELERATOR=cpu" in lines
    assert not [line for line in lines if line.startswith(("#SBATCH --gpus", "#SBATCH --excl"))]


def test_k8s_manifest_indexed_job_headless_service_and_secret_references(env, tmp_path):
    # A profile of the launching machine's ~/.aws/config: pods have none (boto3 would refuse).
    env.setenv("AWS_PROFILE", "research")
    out = tmp_path / "job.k8s.yaml"
    argv = [JOB, "--scheduler", "k8s", "--nodes", "2", "--gpus-per-node", "4", "--out", str(out)]
    argv += ["checkpoint.dir=s3://soho-checkpoints/demo"]
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
    assert container["resources"] == {
        "requests": {"cpu": 8, "nvidia.com/gpu": 4},
        "limits": {"nvidia.com/gpu": 4},
    }
    shm, runs = pod["spec"]["volumes"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert runs == {"name": "runs", "emptyDir": {}}
    assert {"name": shm["name"], "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "runs", "mountPath": "/workspace/runs"} in container["volumeMounts"]
    # Preemption: the ranks get the spec's grace to commit; exit 75 and evictions restart the pod.
    assert pod["spec"]["terminationGracePeriodSeconds"] == 180
    assert pod["spec"]["restartPolicy"] == "Never"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [75]},
        "onPodConditions": [],
    }
    assert rules[1] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    variables = {v["name"]: v for v in container["env"]}
    assert variables["S3_ENDPOINT_URL"]["value"] == "http://storage.internal:9000"
    assert "AWS_PROFILE" not in variables
    for key, secret in (
        ("AWS_ACCESS_KEY_ID", "soho-s3"),
        ("AWS_SECRET_ACCESS_KEY", "soho-s3"),
        ("AWS_SESSION_TOKEN", "soho-s3"),
        ("MLFLOW_TRACKING_TOKEN", "soho-mlflow"),
    ):
        assert "value" not in variables[key]
        reference = variables[key]["valueFrom"]["secretKeyRef"]
        assert (reference["name"], reference["key"]) == (secret, key)
        # Optional: pod identity (IRSA) stores no keys; a missing key must not hold pods back.
        assert reference["optional"] is True
    script = container["command"][-1]
    subprocess.run(["bash", "-n", "-c", script], check=True)
    launch = script.splitlines()[-1]  # exec: the node launcher is the container's PID 1
    assert launch.startswith("exec python -m soho_scale.launch.node --nodes 2 --procs 4 ")
    assert f'--node-rank "$JOB_COMPLETION_INDEX" --master-addr {name}-0.{name}' in launch
    assert launch.endswith(
        "-- train jobs/demo/pretrain.yaml checkpoint.dir=s3://soho-checkpoints/demo "
        "batch.global_batch=128"
    )
    for version in K8S_VERSIONS:
        for document in (service, job):
            kubernetes_validate.validate(document, version, strict=True)


def test_launch_refuses_counts_and_ports_out_of_range(env, tmp_path):
    out = str(tmp_path / "m.sbatch")
    for flag, value, expected in (("--nodes", "-2", "at least 1"), ("--nodes", "0", "at least 1"),
                                  ("--gpus-per-node", "-4", "at least 1"),
                                  ("--master-port", "99999", "1..65535")):  # fmt: skip
        with pytest.raises(ClusterError, match=f"^{flag} {value}: expected {expected}$"):
            launch_main([JOB, "--scheduler", "slurm", flag, value, "--out", out])
    assert not os.path.exists(out)


def test_k8s_launch_warns_when_cnn_weights_come_from_a_hub_cache(env, tmp_path, capsys):
    out = str(tmp_path / "m.yaml")
    argv = [JOB, "--scheduler", "k8s", "--out", out]
    assert launch_main(argv) == 0
    assert "torch hub cache" not in capsys.readouterr().err
    paper = "jobs/pretrain/soho_r18_l3_coco_vg.yaml"  # cnn_init: ResNet18_Weights.IMAGENET1K_V1
    assert launch_main([paper, "--scheduler", "k8s", "--out", out]) == 0
    err = capsys.readouterr().err
    assert "cnn_init ResNet18_Weights.IMAGENET1K_V1 is read from the torch hub cache" in err


def test_k8s_name_must_start_with_a_letter(env, tmp_path):
    out = str(tmp_path / "m.yaml")
    with pytest.raises(ClusterError, match="starting with a letter"):
        launch_main([JOB, "--scheduler", "k8s", "--name", "9soho", "--out", out])


def test_k8s_job_on_several_pods_needs_an_s3_checkpoint_dir(env, tmp_path):
    out = str(tmp_path / "m.yaml")
    with pytest.raises(ClusterError, match="pods share no folder"):
        launch_main(
            [JOB, "--scheduler", "k8s", "--nodes", "2", "--gpus-per-node", "1", "--out", out]
        )


def test_k8s_job_file_outside_the_repo_is_a_user_error(env, tmp_path):
    outside = tmp_path / "job.yaml"
    outside.write_text((REPO / JOB).read_text())
    with pytest.raises(ClusterError, match="inside the repo"):
        launch_main([str(outside), "--scheduler", "k8s", "--out", str(tmp_path / "m.yaml")])


def test_k8s_cpu_manifest_with_a_volume_and_memory_validates(env, tmp_path):
    out = tmp_path / "cpu.k8s.yaml"
    argv = [JOB, "resources.volume_claim=soho-runs", "resources.mem_gib_per_node=16"]
    argv += ["batch.global_batch=64"]
    argv += ["checkpoint.save_grace_s=900", "--scheduler", "k8s", "--cpu", "--nodes", "2"]
    argv += ["checkpoint.dir=s3://soho-checkpoints/demo"]
    argv += ["--procs-per-node", "2", "--out", str(out)]
    assert launch_main(argv) == 0
    service, job = yaml.safe_load_all(out.read_text())
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"] == {
        "requests": {"cpu": 4, "memory": "16Gi"},
        "limits": {"memory": "16Gi"},
    }
    assert {"name": "DS_ACCELERATOR", "value": "cpu"} in container["env"]
    assert pod["terminationGracePeriodSeconds"] == 900
    assert {"name": "runs", "persistentVolumeClaim": {"claimName": "soho-runs"}} in pod["volumes"]
    assert {
        "name": "runs",
        "mountPath": "/workspace/runs",
        "subPathExpr": "node-$(SOHO_NODE_INDEX)",
    } in container["volumeMounts"]
    for version in K8S_VERSIONS:
        for document in (service, job):
            kubernetes_validate.validate(document, version, strict=True)


INJECTIONS = ["x\nrm -rf ~", "$(touch /tmp/pwned)", "a'b\"c", "run`id`"]


@pytest.mark.parametrize("payload", INJECTIONS)
def test_injection_into_the_sbatch_script_is_rejected_or_inert(env, tmp_path, payload):
    """A hostile value in an `#SBATCH` option is rejected with one line; in the job path or an
    override it is rejected (control characters) or quoted: the script, run with stand-ins for
    srun and scontrol, passes it to the node launcher as one argument and runs nothing else."""
    out = tmp_path / "job.sbatch"
    for flag in ("--partition", "--account", "--time"):
        with pytest.raises(ClusterError, match=f"^{flag} "):
            launch_main([JOB, "--scheduler", "slurm", "--out", str(out), flag, payload])
    with pytest.raises(SpecError, match="^name: "):  # the job name goes into #SBATCH --job-name
        launch_main([JOB, f"name={payload}", "--scheduler", "slurm", "--out", str(out)])
    jobs = REPO / "jobs" / "test_injection"
    jobs.mkdir(exist_ok=True)
    hostile = jobs / f"job {payload.replace('/', '_')}.yaml"
    try:
        if "\n" in payload:
            hostile = jobs / "job.yaml"
            hostile.write_text((REPO / JOB).read_text())
            for argv in (
                [str(hostile), f"tracking.run_name={payload}"],
                [str(hostile), "--run-dir", payload],
            ):
                with pytest.raises(ClusterError, match="control characters"):
                    launch_main([*argv, "--scheduler", "slurm", "--out", str(out)])
            return
        hostile.write_text((REPO / JOB).read_text())
        override = f"tracking.run_name={payload}"
        argv = [str(hostile), override, "--scheduler", "slurm", "--out", str(out), "--cpu"]
        assert launch_main(argv + ["--setup", "true"]) == 0
        received = _run_with_stand_ins(out, tmp_path)
        assert received[-2:] == [str(hostile.relative_to(REPO)), override]
        assert not Path("/tmp/pwned").exists()
    finally:
        shutil.rmtree(jobs)


def _run_with_stand_ins(script: Path, tmp_path: Path) -> list[str]:
    """Run the sbatch script with srun/scontrol/python stand-ins; the node launcher's argv."""
    shims = tmp_path / "bin"
    shims.mkdir()
    tools = {
        "scontrol": 'echo "NodeName=n0 NodeAddr=10.0.0.1 State=IDLE"',
        "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\nSLURM_NODEID=0 "$@"',
        "python": f'printf "%s\\0" "$@" > {tmp_path}/argv',
    }
    for name, body in tools.items():
        (shims / name).write_text(f"#!/bin/bash\n{body}\n")
        (shims / name).chmod(0o755)
    run_env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", SLURM_JOB_ID="7")
    run_env["SLURM_JOB_NODELIST"] = "n0"
    subprocess.run(["bash", str(script)], check=True, env=run_env, timeout=60, cwd=tmp_path)
    return (tmp_path / "argv").read_text().split("\0")[:-1]


@pytest.mark.parametrize("payload", INJECTIONS)
def test_injection_into_the_k8s_manifest_is_rejected_or_inert(env, tmp_path, payload):
    out = tmp_path / "m.yaml"
    base = [JOB, "--scheduler", "k8s", "--out", str(out)]
    for flag in ("--image", "--s3-secret", "--mlflow-secret", "--shm-size", "--name"):
        with pytest.raises(ClusterError, match=f"^{flag} "):
            launch_main([*base, flag, payload])
    override = f"tracking.run_name={payload}"
    if "\n" in payload:
        with pytest.raises(ClusterError, match="control characters"):
            launch_main([*base, override])
        return
    assert launch_main([*base, override]) == 0
    documents = list(yaml.safe_load_all(out.read_text()))
    assert [d["kind"] for d in documents] == ["Service", "Job"]
    (container,) = documents[1]["spec"]["template"]["spec"]["containers"]
    launch = container["command"][-1].splitlines()[-1]
    assert shlex.split(launch)[-2:] == [JOB, override]


def test_dockerfile_builds_the_image_the_manifests_expect(tmp_path):
    """The Dockerfile's own steps, run here in order into a scratch /workspace with a fresh venv
    for the image's Python (no container runtime or registry here; the system packages and the
    dependencies from PyPI are left out: `--no-deps`, this venv sees the repo's): the editable
    install over stub packages, then the code copied in, gives an image where the manifests'
    command runs from the manifests' workingDir and the code finds ds_configs/ and jobs/."""
    from soho_scale.launch.kubernetes import K8S_WORKDIR

    steps = []
    for line in (REPO / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            steps.append(line.split(None, 1))
    assert steps[0][0] == "FROM" and steps[0][1].startswith("python:3.11")  # as tested here
    assert ["WORKDIR", K8S_WORKDIR] in steps
    ignored = set((REPO / ".dockerignore").read_text().split())
    root = tmp_path / "workspace"
    venv = tmp_path / "venv"
    # The scratch venv's own pip: one run from this venv would uninstall the repo's own
    # editable soho-scale first (same project), breaking every later `python -m soho_scale...`.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    for kind, rest in steps[1:]:
        if kind == "WORKDIR":
            root.mkdir()
        elif kind == "COPY":
            *sources, _ = rest.split()
            for source in sources:
                assert source not in ignored
                copy = shutil.copytree if (REPO / source).is_dir() else shutil.copy
                copy(REPO / source, root / source)
        elif kind == "RUN" and "apt-get" not in rest:
            command = rest.replace("pip install", "pip install --no-deps")
            subprocess.run(["bash", "-c", command], cwd=root, env=env, check=True)
    # The dependencies: this venv's, seen by the image's venv once its install is done.
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "repo-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = (  # from elsewhere than /workspace: the installed package is the one found
        "from soho_scale.spec.ds_template import DS_CONFIG_DIR; from soho_scale.spec import load_job; "
        "import soho_scale.launch.node; print(DS_CONFIG_DIR); "
        f"print(load_job('{root}/jobs/pretrain/soho_r101_l12_coco_vg.yaml').name)"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env, capture_output=True,
        text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert out == [str(root / "ds_configs"), "soho_r101_l12_coco_vg"]
