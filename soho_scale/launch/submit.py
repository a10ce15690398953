"""`soho-scale launch`: one job spec onto many machines.

Three ways, all ending in `python -m soho_scale.launch.rank train JOB [overrides]` ranks on
every node:
- `--hostfile FILE`: the DeepSpeed runner across hosts (`soho_scale.launch.hostfile`).
- `--scheduler slurm --out FILE`: an sbatch script, one task per node, each running the node
  launcher (`soho_scale.launch.slurm`, `soho_scale.launch.node`; submitted with `--submit`).
- `--scheduler k8s --out FILE`: an indexed Kubernetes Job plus a headless Service for the
  rendezvous, the node launcher as each pod's PID 1 (`soho_scale.launch.kubernetes`).

What travels to the nodes, and what never does (secrets), is `soho_scale.launch.environment`.
The job file must be inside the repo for the schedulers: nodes and containers see the repo, not
this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from data_pipeline.urls import is_s3_url
from soho_scale.launch.environment import cluster_env
from soho_scale.launch.errors import ClusterError, checked, no_control_characters
from soho_scale.launch.hostfile import hostfile_launch
from soho_scale.launch.kubernetes import K8S_WORKDIR, k8s_manifest, k8s_name
from soho_scale.launch.node import NodeShape
from soho_scale.launch.slurm import sbatch_script, slurm_options
from soho_scale.pretrained import WEIGHTS_NAME
from soho_scale.spec import Job, accumulation_steps, load_job


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
    """Run `tool path`, echo what it says; a refusal is a ClusterError with its message."""
    if shutil.which(tool[0]) is None:
        raise ClusterError(f"{tool[0]} not found; submit {path} from a machine that has it")
    done = subprocess.run([*tool, path], capture_output=True, text=True)
    if done.returncode != 0:
        reason = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise ClusterError(f"{tool[0]} refused {path}: {reason}")
    print(done.stdout.strip())
    return 0


def scheduler_launch(args: argparse.Namespace, job: Job) -> int:
    """`--scheduler slurm|k8s`: write the sbatch script or manifest to --out; with --submit,
    submit it."""
    if not args.out:
        raise ClusterError(f"--scheduler {args.scheduler}: give --out FILE for the script")
    nodes = args.nodes or job.resources.nodes
    procs = args.gpus_per_node or job.resources.procs_per_node
    accumulation_steps(job, nodes * procs)
    shape = NodeShape.of(job, nodes, procs, gpus=not args.cpu)
    workdir = os.path.abspath(args.workdir)
    job_path = no_control_characters("job file", relative_job_path(args.job, workdir))
    for value in args.overrides:
        no_control_characters("override", value)
    if args.run_dir:
        no_control_characters("--run-dir", args.run_dir)
    env = cluster_env(dict(os.environ), args.cpu)
    if args.scheduler == "slurm":
        setup, options = slurm_options(args, workdir)
        text = sbatch_script(
            job, job_path, args.overrides, shape, args.master_port, workdir, env,
            args.run_dir, setup, options,
        )  # fmt: skip
        _write(args.out, text, 0o755)
        print(f"wrote {args.out}: sbatch script, {shape.describe()}")
        return _submit(["sbatch"], args.out) if args.submit else 0
    if not is_s3_url(job.checkpoint.dir):
        if nodes > 1:  # each pod would hold its own ranks' part of every checkpoint
            raise ClusterError(
                f"checkpoint.dir {job.checkpoint.dir}: pods share no folder; give an s3:// "
                "checkpoint.dir for a job on several pods"
            )
        if not job.resources.volume_claim:
            print(
                f"warning: checkpoint.dir {job.checkpoint.dir} is inside the pod and lost with "
                "it; use s3:// (or resources.volume_claim) to resume after preemption",
                file=sys.stderr,
            )
    cnn_init = None if job.model.init_from else job.model.config().cnn_init
    if cnn_init and WEIGHTS_NAME.match(cnn_init):
        print(
            f"warning: model.overrides.cnn_init {cnn_init} is read from the torch hub cache "
            "(TORCH_HOME), which the image does not hold; set it to an s3:// URL of the file "
            "or mount a volume holding the cache at TORCH_HOME",
            file=sys.stderr,
        )
    text = k8s_manifest(
        job, job_path, args.overrides, shape, args.master_port or 29500,
        checked("--image", args.image, "image"), env, k8s_name(job, args.name), args.run_dir,
        checked("--s3-secret", args.s3_secret, "k8s"),
        checked("--mlflow-secret", args.mlflow_secret, "k8s"),
        checked("--shm-size", args.shm_size, "quantity"),
    )  # fmt: skip
    _write(args.out, text)
    print(f"wrote {args.out}: Kubernetes Job + headless Service, {shape.describe()}")
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
    parser.add_argument(
        "--gpus-per-node", "--procs-per-node", type=int, help="default: resources.procs_per_node"
    )
    parser.add_argument(
        "--cpu", action="store_true", help="ranks on CPU over gloo, no GPUs asked for (slurm/k8s)"
    )
    parser.add_argument(
        "--master-port",
        type=int,
        help="rendezvous port (default: the runner's; slurm: one per job id; k8s: 29500)",
    )
    parser.add_argument("--run-dir", help="run folder (default: runs/<job name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the command, start nothing")
    hostfile = parser.add_argument_group("--hostfile")
    hostfile.add_argument(
        "--launcher",
        default="pdsh",
        choices=("pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi"),
        help="DeepSpeed runner's launcher",
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
    for flag, value, low, high in (("--nodes", args.nodes, 1, None),
                                   ("--gpus-per-node", args.gpus_per_node, 1, None),
                                   ("--master-port", args.master_port, 1, 65535)):  # fmt: skip
        if value is not None and not (low <= value and (high is None or value <= high)):
            expected = f"{low}..{high}" if high else f"at least {low}"
            raise ClusterError(f"{flag} {value}: expected {expected}")
    job = load_job(args.job, args.overrides)  # a bad spec fails before anything is written
    if args.hostfile:
        return hostfile_launch(args, job)
    return scheduler_launch(args, job)
