"""What a run records about where it came from, as MLflow params: the resolved spec and its
overrides, the derived numbers, library versions and the code's git commit, every data stream's
index (URL, sha256, samples, shards), and which library patches are on."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
from typing import Any

from data_pipeline import patches as data_patches
from data_pipeline.patches import guard
from data_pipeline.storage import INDEX_BASENAME, read_bytes
from data_pipeline.urls import join_url
from soho_scale.engine import patches as engine_patches
from soho_scale.engine.tracking import flatten
from soho_scale.spec import Job

PACKAGES = ("torch", "deepspeed", "transformers", "mosaicml-streaming", "mlflow")


def dataset_lineage(job: Job) -> dict[str, str]:
    lineage = {}
    for i, stream in enumerate(job.data.streams):
        index = read_bytes(join_url(stream.remote, INDEX_BASENAME))
        shards = json.loads(index)["shards"]
        lineage[f"data.stream{i}.url"] = stream.remote
        lineage[f"data.stream{i}.index_sha256"] = hashlib.sha256(index).hexdigest()
        lineage[f"data.stream{i}.samples"] = str(sum(s["samples"] for s in shards))
        lineage[f"data.stream{i}.shards"] = str(len(shards))
    return lineage


def environment_params() -> dict[str, str]:
    params = {}
    for package in PACKAGES:
        try:
            params[f"version.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    params["git_sha"] = sha or "unknown"
    return params


def patch_params() -> dict[str, str]:
    """`patch.<name>`: "on", "forced", "off: why" as decided in this process, or "not used"."""
    decided = guard.decisions()
    names = [m.rsplit(".", 1)[-1] for m in (*data_patches.MODULES, *engine_patches.MODULES)]
    return {f"patch.{name}": decided.get(name, "not used") for name in names}


def run_params(job: Job, numbers: dict[str, Any], rank: int) -> dict[str, str]:
    """Every param of a new run (rank 0 adds the data streams' lineage)."""
    params = flatten(json.loads(job.model_dump_json(exclude={"overrides"})))
    params.update({f"derived.{k}": str(v) for k, v in numbers.items()})
    params["overrides"] = " ".join(job.overrides) or "-"
    params.update(environment_params())
    params.update(patch_params())
    if rank == 0:
        params.update(dataset_lineage(job))
    return params
