"""`soho-scale launch --scheduler k8s`: an indexed Kubernetes Job and the headless Service its
pods resolve each other by.

One pod per node; node rank = JOB_COMPLETION_INDEX, master = pod 0's DNS name under the Service.
Each pod's PID 1 is the node launcher (`soho_scale.launch.node`), which forwards the kubelet's
SIGTERM to the ranks; they commit a checkpoint within `checkpoint.save_grace_s` (the pod's
termination grace) and exit 75, which the Job's podFailurePolicy does not count as a failure: it
starts the pod again and training resumes (so does an eviction). Resources come from the spec's
`resources` (CPU and memory requests, GPUs), the run folder and shard cache from a volume
(`resources.volume_claim`). Non-secret settings are set by value; S3 and MLflow credentials come
from Kubernetes Secrets, by reference.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import yaml

from soho_scale import PREEMPTED_EXIT_CODE
from soho_scale.launch.errors import ClusterError
from soho_scale.launch.node import NodeShape, node_command
from soho_scale.launch.rank import rank_args
from soho_scale.spec import Job

K8S_WORKDIR = "/workspace"
CONTAINER = "trainer"


def k8s_name(job: Job, name: str | None) -> str:
    """A DNS-1123 label for the Job and Service (pod hostnames add `-<index>`)."""
    if not name:
        name = re.sub(r"[^a-z0-9-]+", "-", job.name.lower())
        name = name if name.startswith("soho") else "soho-" + name
    name = name.strip("-")[:50].strip("-")
    # The Service's name is a DNS-1035 label: it starts with a letter.
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        raise ClusterError(
            f"--name {name!r}: use lowercase letters, digits and '-', starting with a letter"
        )
    return name


def k8s_manifest(
    job: Job,
    job_path: str,
    overrides: list[str],
    shape: NodeShape,
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
    launch = node_command(
        rank_args(job_path, overrides, run_dir),
        shape.nodes,
        shape.procs,
        '"$JOB_COMPLETION_INDEX"',
        master,
        str(master_port),
    )
    script = "\n".join(
        [
            "set -euo pipefail",
            # Pod 0's DNS record appears once it is scheduled; wait for it (bounded). Stopped
            # meanwhile, nothing has started: exit as preempted (the Job starts the pod again).
            f"trap 'exit {PREEMPTED_EXIT_CODE}' TERM",
            f"for try in $(seq 1 150); do getent hosts {master} >/dev/null && break; sleep 2; done",
            launch,  # exec: the node launcher is PID 1 and gets the kubelet's SIGTERM itself
        ]
    )
    # A pod has no ~/.aws/config, and boto3 refuses to start with a profile it cannot find.
    variables: list[dict[str, Any]] = [
        {"name": k, "value": v} for k, v in env.items() if k != "AWS_PROFILE"
    ]
    # Optional: a cluster with pod identity (IRSA, workload identity) stores no keys; the keys
    # of temporary credentials come with a session token.
    variables += [
        {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": key, "optional": True}},
        }
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    ]
    # MLflow's token or basic auth (MLFLOW_TRACKING_URI travels without a user:password)
    variables += [
        {
            "name": key,
            "valueFrom": {
                "secretKeyRef": {
                    "name": mlflow_secret,
                    "key": key,
                    "optional": True,  # tracking servers without authentication
                }
            },
        }
        for key in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    ]
    # The pod's index, for its sub-folder of the runs volume (kept across the pod's restarts).
    variables.append(
        {
            "name": "SOHO_NODE_INDEX",
            "valueFrom": {
                "fieldRef": {
                    "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
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
    requests: dict[str, Any] = {"cpu": shape.cpus}
    limits: dict[str, Any] = {}
    if shape.mem_gib:
        requests["memory"] = limits["memory"] = f"{shape.mem_gib}Gi"
    if shape.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = shape.procs
    runs_mount: dict[str, Any] = {"name": "runs", "mountPath": f"{K8S_WORKDIR}/runs"}
    if job.resources.volume_claim:
        runs_volume: dict[str, Any] = {
            "name": "runs",
            "persistentVolumeClaim": {"claimName": job.resources.volume_claim},
        }
        runs_mount["subPathExpr"] = "node-$(SOHO_NODE_INDEX)"
    else:
        runs_volume = {"name": "runs", "emptyDir": {}}
    pod = {
        "metadata": {"labels": labels},
        "spec": {
            "subdomain": name,  # with the Service of the same name: <name>-<i>.<name> resolves
            "restartPolicy": "Never",  # the Job replaces a stopped pod (podFailurePolicy)
            # SIGTERM to SIGKILL: the time the ranks need to commit a checkpoint.
            "terminationGracePeriodSeconds": shape.grace_s,
            "containers": [
                {
                    "name": CONTAINER,
                    "image": image,
                    "workingDir": K8S_WORKDIR,
                    "command": ["bash", "-c", script],
                    "env": variables,
                    "ports": [{"containerPort": master_port, "name": "rendezvous"}],
                    "resources": {"requests": requests, **({"limits": limits} if limits else {})},
                    "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}, runs_mount],
                }
            ],
            "volumes": [
                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
                runs_volume,
            ],
        },
    }
    job_object = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": shape.nodes,
            "parallelism": shape.nodes,
            # A crash of one pod stalls the others' collectives: fail the whole Job (resubmit to
            # resume). A preemption does not count: the ranks commit a checkpoint and exit 75,
            # or the pod is evicted; either way the Job starts a new pod for that index.
            "backoffLimit": 0,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "Ignore",
                        "onExitCodes": {
                            "containerName": CONTAINER,
                            "operator": "In",
                            "values": [PREEMPTED_EXIT_CODE],
                        },
                        # Empty, not absent: the 1.26-1.27 API schema requires the field.
                        "onPodConditions": [],
                    },
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                ]
            },
            "template": pod,
        },
    }
    header = (
        f"# soho-scale launch {shlex.quote(job_path)} --scheduler k8s: {shape.describe()}.\n"
        f"# Image {image}: the repo at {K8S_WORKDIR}, its dependencies installed (Dockerfile).\n"
        f"# On SIGTERM (eviction, preemption, kubectl delete pod) the ranks commit a checkpoint\n"
        f"# within {shape.grace_s} s and exit {PREEMPTED_EXIT_CODE}; the Job starts the pod again\n"
        f"# and training resumes. After any other failure the Job fails: resume with\n"
        f"# `kubectl delete job {name}`, then apply this file again.\n"
        f"# Secrets, by reference only. Create them once, e.g.:\n"
        f"#   kubectl create secret generic {s3_secret} "
        '--from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" '
        '--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"\n'
        f"#   kubectl create secret generic {mlflow_secret} "
        '--from-literal=MLFLOW_TRACKING_TOKEN="$MLFLOW_TRACKING_TOKEN"'
        "  (or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)\n"
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
