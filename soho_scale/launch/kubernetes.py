"""`soho-scale launch --scheduler k8s`: an indexed Kubernetes Job and the headless Service its
pods resolve each other by.

One pod per node; node rank = JOB_COMPLETION_INDEX, master = pod 0's DNS name under the Service.
Each pod writes a hostfile of the pods and runs DeepSpeed's runner with `--no_ssh`. Non-secret
settings are set by value; S3 and MLflow credentials come from Kubernetes Secrets, by reference.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import yaml

from soho_scale.launch.errors import ClusterError
from soho_scale.launch.rank import rank_module_args
from soho_scale.spec import Job

K8S_WORKDIR = "/workspace"


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
    node_args = shlex.join(rank_module_args(job_path, overrides, run_dir))
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
