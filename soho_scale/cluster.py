"""`soho-scale launch`: one job spec onto many machines.

Three ways, all ending in `deepspeed ... --module soho_scale.train JOB [overrides]` on every node:
- `--hostfile FILE`: the DeepSpeed launcher across hosts (pdsh by default, or `--launcher
  openmpi|mvapich|slurm|mpich|impi`). The repo and its venv must be at the same path on every host.
- `--scheduler slurm --out FILE`: an sbatch script, one task per node; each task runs the launcher
  with `--no_ssh --node_rank $SLURM_NODEID` (submitted with `--submit`).
- `--scheduler k8s --out FILE`: an indexed Kubernetes Job plus a headless Service for the
  rendezvous; node rank = JOB_COMPLETION_INDEX, master = pod 0's DNS name.

Secrets never go into a file we write: non-secret settings (endpoint, region, tracking URI) are
propagated by value; credentials come from each host's own environment or AWS chain (hostfile,
Slurm) or from Kubernetes Secrets by reference.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from soho_scale.launch import launcher_command
from soho_scale.spec import Job, accumulation_steps, load_job


class ClusterError(ValueError):
    """A launch request that cannot work (bad hostfile, job outside the repo, missing tool)."""


# Settings every rank needs whose values are not secret; propagated by value.
PROPAGATED = (
    "S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "SOHO_PEAK_FLOPS",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "DS_ACCELERATOR",
)
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|SESSION|PRIVATE")
# The DeepSpeed runner copies every variable with these prefixes onto the remote command line.
DEEPSPEED_AUTO_EXPORTS = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")
DEEPSPEED_ENV_NAME = ".deepspeed_env"  # runner.py: DS_ENV_FILE, looked up in ~ and the CWD
K8S_WORKDIR = "/workspace"


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name.upper()))


def propagated_env(environ: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(non-secret settings to propagate by value, notes on what was held back and why)."""
    secret_values = {v for k, v in environ.items() if is_secret_name(k) and v}
    values, notes = {}, []
    for name in PROPAGATED:
        value = environ.get(name)
        if not value:
            continue
        parsed = urllib.parse.urlparse(value)
        if "://" in value and (parsed.username or parsed.password) or value in secret_values:
            notes.append(f"{name} not propagated: its value holds a credential")
            continue
        values[name] = value
    return values, notes


# ---- hostfile: the DeepSpeed launcher across hosts -----------------------------------------


def read_hostfile(path: str) -> dict[str, int]:
    """`host slots=N` lines (MPI style, # comments) -> {host: slots}."""
    if not os.path.isfile(path):
        raise ClusterError(f"{path}: hostfile not found (lines like `worker-0 slots=8`)")
    hosts: dict[str, int] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not match:
            raise ClusterError(f"{path}:{number}: expected `HOST slots=N`, got {line!r}")
        if match.group(1) in hosts:
            raise ClusterError(f"{path}:{number}: host {match.group(1)} listed twice")
        hosts[match.group(1)] = int(match.group(2))
    if not hosts:
        raise ClusterError(f"{path}: no hosts listed")
    return hosts


def _user_env_files() -> list[str]:
    # The files the DeepSpeed runner would read if we did not point DS_ENV_FILE at ours.
    name = os.environ.get("DS_ENV_FILE", DEEPSPEED_ENV_NAME)
    paths = [os.path.join(os.path.expanduser("~"), name), os.path.join(".", name)]
    return [p for p in dict.fromkeys(os.path.abspath(p) for p in paths) if os.path.isfile(p)]


def deepspeed_env(environ: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """What the env file holds: the user's own .deepspeed_env entries and our settings, minus
    anything that looks like a secret (those must already be in each host's environment)."""
    values, notes = {}, []
    for path in _user_env_files():
        for line in Path(path).read_text().splitlines():
            name, sep, value = line.partition("=")
            if not sep or not name.strip():
                continue
            if is_secret_name(name):
                notes.append(f"{name.strip()} from {path} not propagated: looks like a secret")
                continue
            values[name.strip()] = value.strip()
    ours, held_back = propagated_env(environ)
    return {**values, **ours}, notes + held_back


def write_env_file(path: str, values: dict[str, str]) -> None:
    # The runner splits every line on "=": no comments, no blank lines.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in values.items())


def launcher_environment(environ: dict[str, str], env_file: str) -> tuple[dict[str, str], list]:
    """The runner's environment: ours, pointed at the env file, with secrets the runner would
    copy onto every remote command line (MLFLOW_TRACKING_TOKEN...) removed."""
    env = dict(environ)
    removed = [
        k for k in env if k.startswith(DEEPSPEED_AUTO_EXPORTS) and is_secret_name(k) and env[k]
    ]
    for name in removed:
        del env[name]
    env["DS_ENV_FILE"] = os.path.abspath(env_file)
    return env, removed


def hostfile_launch(args: argparse.Namespace, job: Job) -> int:
    hosts = read_hostfile(args.hostfile)
    nodes = args.nodes or job.resources.nodes
    gpus = args.gpus_per_node or job.resources.procs_per_node
    accumulation_steps(job, nodes * gpus)
    if len(hosts) < nodes:
        raise ClusterError(f"{args.hostfile}: {len(hosts)} host(s) listed, the job needs {nodes}")
    short = [h for h in list(hosts)[:nodes] if hosts[h] < gpus]
    if short:
        raise ClusterError(
            f"{args.hostfile}: {', '.join(short)} have fewer than {gpus} slots; "
            "lower --gpus-per-node or fix the hostfile"
        )
    extra = ["--hostfile", args.hostfile, "--launcher", args.launcher, "--num_nodes", str(nodes)]
    if args.launcher_args:
        extra += ["--launcher_args", args.launcher_args]
    if args.master_addr:
        extra += ["--master_addr", args.master_addr]
    cmd = launcher_command(
        args.job, args.overrides, gpus, args.run_dir, args.master_port, extra=extra
    )
    env_file = args.env_file or os.path.join(args.run_dir or f"runs/{job.name}", "deepspeed_env")
    values, notes = deepspeed_env(dict(os.environ))
    write_env_file(env_file, values)
    env, removed = launcher_environment(dict(os.environ), env_file)
    print(f"env file {os.path.abspath(env_file)} (DS_ENV_FILE) propagates to every host:")
    for name, value in values.items():
        print(f"  {name}={value}")
    for note in notes:
        print(f"  note: {note}")
    if removed:
        print(f"  held back (each host needs them in its own environment): {', '.join(removed)}")
    print("  credentials: each host's own environment / AWS chain (never written here)")
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    return subprocess.call(cmd, env=env)


# ---- Slurm ---------------------------------------------------------------------------------


def _node_command(job_path: str, overrides: list[str], run_dir: str | None) -> list[str]:
    cmd = ["--module", "soho_scale.train", job_path, *overrides]
    return cmd + (["--run-dir", run_dir] if run_dir else [])


def _default_setup(workdir: str) -> list[str]:
    # Running inside a venv that lives in the repo: activate the same one on the nodes.
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
    node_args = shlex.join(_node_command(job_path, overrides, run_dir))
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


# ---- Kubernetes ----------------------------------------------------------------------------


def k8s_name(job: Job, name: str | None) -> str:
    """A DNS-1123 label for the Job and Service (pod hostnames add `-<index>`)."""
    if not name:
        name = re.sub(r"[^a-z0-9-]+", "-", job.name.lower())
        name = name if name.startswith("soho") else "soho-" + name
    name = name.strip("-")[:50].strip("-")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
        raise ClusterError(f"--name {name!r}: use lowercase letters, digits and '-'")
    return name


def k8s_manifest(
    job: Job,
    job_path: str,
    overrides: list[str],
    nodes: int,
    gpus: int,
    master_port: int,
    image: str,
    env: dict[str, str],
    name: str,
    run_dir: str | None = None,
    s3_secret: str = "soho-s3",
    mlflow_secret: str = "soho-mlflow",
    shm_size: str = "64Gi",
) -> str:
    """An indexed Job (one pod per node) and the headless Service its pods resolve each other by."""
    master = f"{name}-0.{name}"  # pod 0's hostname under the Service's subdomain
    node_args = shlex.join(_node_command(job_path, overrides, run_dir))
    script = "\n".join(
        [
            "set -euo pipefail",
            f'for i in $(seq 0 {nodes - 1}); do echo "{name}-$i.{name} slots={gpus}"; done '
            "> /tmp/hostfile",
            # Pod 0's DNS record appears once it is scheduled; wait for it (bounded).
            f"for try in $(seq 1 150); do getent hosts {master} >/dev/null && break; sleep 2; done",
            f'exec deepspeed --hostfile /tmp/hostfile --no_ssh --node_rank "$JOB_COMPLETION_INDEX" '
            f"--num_nodes {nodes} --num_gpus {gpus} --master_addr {master} "
            f"--master_port {master_port} {node_args}",
        ]
    )
    variables: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in env.items()]
    variables += [
        {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": key}},
        }
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    ]
    variables.append(
        {
            "name": "MLFLOW_TRACKING_TOKEN",
            "valueFrom": {
                "secretKeyRef": {
                    "name": mlflow_secret,
                    "key": "MLFLOW_TRACKING_TOKEN",
                    "optional": True,  # tracking servers without authentication
                }
            },
        }
    )
    labels = {"app.kubernetes.io/name": "soho-scale", "soho-scale/job": name}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "clusterIP": "None",
            "selector": {"soho-scale/job": name},
            # Ranks resolve each other before any readiness: publish every pod's address.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": master_port}],
        },
    }
    gpu = {"nvidia.com/gpu": gpus}
    pod = {
        "metadata": {"labels": labels},
        "spec": {
            "subdomain": name,  # with the Service of the same name: <name>-<i>.<name> resolves
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "trainer",
                    "image": image,
                    "workingDir": K8S_WORKDIR,
                    "command": ["bash", "-c", script],
                    "env": variables,
                    "ports": [{"containerPort": master_port, "name": "rendezvous"}],
                    "resources": {"limits": dict(gpu), "requests": dict(gpu)},
                    "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
                }
            ],
            "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}}],
        },
    }
    job_object = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            # One lost pod stalls the others' collectives: fail the whole Job, then resubmit
            # (training resumes from the last committed checkpoint).
            "backoffLimit": 0,
            "template": pod,
        },
    }
    header = (
        f"# soho-scale launch {job_path} --scheduler k8s: {nodes} pod(s) x {gpus} GPUs.\n"
        f"# Image {image}: the repo at {K8S_WORKDIR}, its dependencies installed.\n"
        f"# Secrets, by reference only. Create them once, e.g.:\n"
        f"#   kubectl create secret generic {s3_secret} "
        '--from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" '
        '--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"\n'
        f"#   kubectl create secret generic {mlflow_secret} "
        '--from-literal=MLFLOW_TRACKING_TOKEN="$MLFLOW_TRACKING_TOKEN"\n'
    )
    return header + yaml.dump_all([service, job_object], Dumper=_ManifestDumper, sort_keys=False)


class _ManifestDumper(yaml.SafeDumper):
    """Readable manifests: no &anchors for repeated label maps, scripts as `|` blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_ManifestDumper.add_representer(str, _represent_str)


# ---- the command ---------------------------------------------------------------------------


def relative_job_path(job_path: str, workdir: str) -> str:
    """The job file relative to the repo root (what nodes and containers see)."""
    relative = os.path.relpath(os.path.abspath(job_path), os.path.abspath(workdir))
    if relative.startswith(".."):
        raise ClusterError(
            f"{job_path}: the job file must be inside the repo ({workdir}) so that every node "
            "and container has it; copy it under jobs/"
        )
    return relative


def _write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _submit(tool: list[str], path: str) -> int:
    if shutil.which(tool[0]) is None:
        raise ClusterError(f"{tool[0]} not found; submit {path} from a machine that has it")
    return subprocess.call([*tool, path])


def scheduler_launch(args: argparse.Namespace, job: Job) -> int:
    if not args.out:
        raise ClusterError(f"--scheduler {args.scheduler}: give --out FILE for the script")
    nodes = args.nodes or job.resources.nodes
    gpus = args.gpus_per_node or job.resources.procs_per_node
    accumulation_steps(job, nodes * gpus)
    workdir = os.path.abspath(args.workdir)
    job_path = relative_job_path(args.job, workdir)
    env, notes = propagated_env(dict(os.environ))
    env.pop("DS_ACCELERATOR", None)  # the cluster has GPUs; a laptop's "cpu" must not travel
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.scheduler == "slurm":
        setup = args.setup if args.setup is not None else _default_setup(workdir)
        options = {"partition": args.partition, "time": args.time, "account": args.account}
        text = sbatch_script(
            job, job_path, args.overrides, nodes, gpus, args.master_port, workdir, env,
            args.run_dir, setup, options,
        )  # fmt: skip
        _write(args.out, text, 0o755)
        print(f"wrote {args.out}: sbatch script, {nodes} node(s) x {gpus} GPUs")
        return _submit(["sbatch"], args.out) if args.submit else 0
    if not job.checkpoint.dir.startswith("s3://"):
        print(
            f"warning: checkpoint.dir {job.checkpoint.dir} is inside the pod and lost with it; "
            "use s3:// to resume after preemption",
            file=sys.stderr,
        )
    text = k8s_manifest(
        job, job_path, args.overrides, nodes, gpus, args.master_port, args.image, env,
        k8s_name(job, args.name), args.run_dir, args.s3_secret, args.mlflow_secret, args.shm_size,
    )  # fmt: skip
    _write(args.out, text)
    print(f"wrote {args.out}: Kubernetes Job + headless Service, {nodes} pod(s) x {gpus} GPUs")
    return _submit(["kubectl", "apply", "-f"], args.out) if args.submit else 0


def launch_main(argv: list[str]) -> int:
    """`soho-scale launch JOB [K=V ...] (--hostfile FILE | --scheduler slurm|k8s --out FILE)`."""
    parser = argparse.ArgumentParser(
        prog="soho-scale launch",
        description="Run a job across nodes: DeepSpeed hostfile, Slurm batch script or Kubernetes.",
    )
    parser.add_argument("job", help="job YAML file (inside the repo for slurm/k8s)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--hostfile", help="MPI-style hostfile: `host slots=N` per line")
    where.add_argument("--scheduler", choices=["slurm", "k8s"])
    parser.add_argument("--nodes", type=int, help="default: resources.nodes")
    parser.add_argument("--gpus-per-node", type=int, help="default: resources.procs_per_node")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--run-dir", help="run folder (default: runs/<job name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the command, start nothing")
    hostfile = parser.add_argument_group("--hostfile")
    hostfile.add_argument(
        "--launcher", default="pdsh", help="pdsh|openmpi|mvapich|slurm|mpich|impi"
    )
    hostfile.add_argument("--launcher-args", help="passed to the launcher as --launcher_args")
    hostfile.add_argument("--master-addr", help="default: node 0's `hostname -I`")
    hostfile.add_argument("--env-file", help="default: RUN_DIR/deepspeed_env")
    scheduler = parser.add_argument_group("--scheduler")
    scheduler.add_argument("--out", help="where to write the sbatch script / manifest")
    scheduler.add_argument("--submit", action="store_true", help="sbatch / kubectl apply it")
    scheduler.add_argument("--workdir", default=".", help="repo root on the nodes (slurm)")
    scheduler.add_argument("--setup", action="append", help="shell line before launch (slurm)")
    scheduler.add_argument("--partition")
    scheduler.add_argument("--time", help="Slurm time limit, e.g. 24:00:00")
    scheduler.add_argument("--account")
    scheduler.add_argument(
        "--image", default="soho-scale:latest", help=f"k8s image with the repo at {K8S_WORKDIR}"
    )
    scheduler.add_argument("--name", help="k8s Job/Service name (default: soho-<job name>)")
    scheduler.add_argument("--s3-secret", default="soho-s3")
    scheduler.add_argument("--mlflow-secret", default="soho-mlflow")
    scheduler.add_argument("--shm-size", default="64Gi", help="k8s /dev/shm size limit")
    args = parser.parse_intermixed_args(argv)
    job = load_job(args.job, args.overrides)  # a bad spec fails before anything is written
    if args.hostfile:
        return hostfile_launch(args, job)
    return scheduler_launch(args, job)
