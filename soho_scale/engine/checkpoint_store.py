"""Where checkpoints are kept: committed or ignored, local folder or s3://.

DeepSpeed writes its `latest` file before the final barrier and not atomically, and a missing
`latest` silently starts from scratch (DESIGN.md). So we keep our own commit marker: after every
rank has written its files, rank 0 lists them with their sizes in `manifest.json`, written to a
temporary name, fsynced and renamed (PyTorch DCP's pattern). Resume only ever loads a checkpoint
whose manifest exists and whose files all have the listed sizes; anything else is partial and
skipped with a warning.

Remote checkpoints (`s3://bucket/prefix`) are written to a local staging folder, uploaded, and
the manifest is uploaded last. Checkpoints are loaded with pickle (DeepSpeed does): anyone who
can write the checkpoint location can run code on every rank, so use trusted locations only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

from data_pipeline.urls import is_s3_url, join_url, split_s3_url

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class Committed:
    step: int
    tag: str
    location: str  # local folder or s3:// URL of this checkpoint


def _client():
    from data_pipeline.storage import s3_client

    return s3_client()


def list_files(folder: str) -> dict[str, int]:
    """Relative path -> size of every file under a local folder (the manifest excluded)."""
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != MANIFEST and not rel.endswith(".tmp"):
                sizes[rel] = os.path.getsize(path)
    return sizes


def write_manifest(
    folder: str, step: int, extra: dict[str, Any], files: dict[str, int] | None = None
) -> dict[str, Any]:
    """Commit a complete local checkpoint folder (rank 0, after all ranks finished writing)."""
    manifest = {"step": step, "files": list_files(folder) if files is None else files, **extra}
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return manifest


def upload_files(folder: str, url: str, files: dict[str, int]) -> None:
    """Upload checkpoint files (one process per node uploads what its node wrote)."""
    client = _client()
    bucket, prefix = split_s3_url(url)
    for rel in files:
        client.upload_file(os.path.join(folder, rel), bucket, f"{prefix}/{rel}")


def put_manifest(url: str, manifest: dict[str, Any]) -> None:
    """Commit a remote checkpoint: the manifest is uploaded after every file it lists."""
    bucket, prefix = split_s3_url(url)
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    _client().put_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}", Body=body)


def download(url: str, folder: str) -> None:
    """Fetch a committed remote checkpoint into a local folder (manifest last)."""
    client = _client()
    bucket, prefix = split_s3_url(url)
    manifest = json.loads(
        client.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read()
    )
    for rel in manifest["files"]:
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        client.download_file(bucket, f"{prefix}/{rel}", path)
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f)


def _read_manifest(location: str) -> dict[str, Any] | None:
    try:
        if is_s3_url(location):
            bucket, prefix = split_s3_url(location)
            body = _client().get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read()
            return json.loads(body)
        with open(os.path.join(location, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
    except Exception as e:  # botocore's NoSuchKey and friends
        if type(e).__name__ in ("NoSuchKey", "ClientError"):
            return None
        raise


def _actual_sizes(location: str) -> dict[str, int]:
    if not is_s3_url(location):
        return list_files(location)
    bucket, prefix = split_s3_url(location)
    sizes = {}
    paginator = _client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            sizes[item["Key"][len(prefix) + 1 :]] = item["Size"]
    return sizes


def _tags(root: str) -> list[str]:
    if is_s3_url(root):
        bucket, prefix = split_s3_url(root)
        paginator = _client().get_paginator("list_objects_v2")
        tags = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/", Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                tags.append(common["Prefix"].rstrip("/").rsplit("/", 1)[-1])
        return tags
    if not os.path.isdir(root):
        return []
    return os.listdir(root)


def is_complete(location: str) -> bool:
    manifest = _read_manifest(location)
    if manifest is None:
        return False
    actual = _actual_sizes(location)
    return all(actual.get(rel) == size for rel, size in manifest["files"].items())


def committed_checkpoints(root: str, warn: bool = True) -> list[Committed]:
    """Complete checkpoints under `root`, oldest first; partial ones are skipped (with a warning)."""
    found = []
    for tag in sorted(_tags(root)):
        match = TAG_PATTERN.match(tag)
        if not match:
            continue
        location = join_url(root, tag)
        if is_complete(location):
            found.append(Committed(int(match.group(1)), tag, location))
        elif warn:
            logger.warning(
                "ignoring partial checkpoint %s (no manifest or missing files)", location
            )
    return found


def prune(root: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` committed checkpoints (local roots only)."""
    if is_s3_url(root):
        client = _client()
        for old in committed_checkpoints(root, warn=False)[:-keep_last]:
            bucket, prefix = split_s3_url(old.location)
            # Manifest first: a half-deleted checkpoint must not look complete.
            client.delete_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
            for rel in _actual_sizes(old.location):
                client.delete_object(Bucket=bucket, Key=f"{prefix}/{rel}")
        return
    for old in committed_checkpoints(root, warn=False)[:-keep_last]:
        os.remove(os.path.join(old.location, MANIFEST))
        shutil.rmtree(old.location, ignore_errors=True)
