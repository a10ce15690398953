"""What a run records about where it came from, as MLflow params: the resolved spec and its
overrides, the derived numbers, library versions and the code's git commit, every data stream's
index (URL, sha256, samples, shards), and which library patches are on; and the streams as MLflow
dataset inputs (name, source URL, the index's digest)."""

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
from data_pipeline.urls import is_s3_url, join_url
from soho_scale.engine import patches as engine_patches
from soho_scale.engine.tracking import flatten
from soho_scale.secrets import redact
from soho_scale.spec import Job

PACKAGES = ("torch", "deepspeed", "transformers", "mosaicml-streaming", "mlflow")


def stream_records(remotes: list[str]) -> list[dict[str, Any]]:
    """Each stream's URL, its index.json's sha256, samples and shards."""
    records = []
    for remote in remotes:
        index = read_bytes(join_url(remote, INDEX_BASENAME))
        shards = json.loads(index)["shards"]
        records.append(
            {
                "url": remote,
                "index_sha256": hashlib.sha256(index).hexdigest(),
                "samples": sum(s["samples"] for s in shards),
                "shards": len(shards),
            }
        )
    return records


def dataset_lineage(records: list[dict[str, Any]]) -> dict[str, str]:
    """`data.stream<i>.url|index_sha256|samples|shards` params."""
    return {
        f"data.stream{i}.{key}": str(value)
        for i, record in enumerate(records)
        for key, value in record.items()
    }


def dataset_inputs(records: list[dict[str, Any]], context: str) -> list[dict[str, str]]:
    """MLflow dataset inputs of the streams: named by their last two path parts
    ("vqa/train2014"), digested by their index (what was read, byte for byte)."""
    return [
        {
            "name": "/".join(r["url"].rstrip("/").split("/")[-2:]),
            "digest": r["index_sha256"][:16],
            "source_type": "s3" if is_s3_url(r["url"]) else "local",
            "source": json.dumps({"uri": redact(r["url"])}),
            "profile": json.dumps({"samples": r["samples"], "shards": r["shards"]}),
            "context": context,
        }
        for r in records
    ]


def log_new_run(tracker: Any, job: Job, numbers: dict[str, Any], rank: int) -> None:
    """What a new training run records: its params and, on rank 0, its data streams (params
    and MLflow dataset inputs)."""
    records = stream_records([s.remote for s in job.data.streams]) if rank == 0 else []
    tracker.log_params(run_params(job, numbers, records))
    tracker.log_inputs(dataset_inputs(records, "train"))


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


def run_params(job: Job, numbers: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, str]:
    """Every param of a new run, the data streams' `records` included."""
    params = flatten(json.loads(job.model_dump_json(exclude={"overrides"})))
    params.update({f"derived.{k}": str(v) for k, v in numbers.items()})
    params["overrides"] = " ".join(job.overrides) or "-"
    params.update(environment_params())
    params.update(patch_params())
    params.update(dataset_lineage(records))
    return params
