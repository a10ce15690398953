"""Where checkpoints are kept: committed or ignored, local folder or s3://.

DeepSpeed writes its `latest` file before the final barrier and not atomically, and a missing
`latest` silently starts from scratch (DESIGN.md). So we keep our own commit marker: after every
rank has written its files, each node reads back and fsyncs what it wrote (files, then folders),
and rank 0 lists every file with its size and sha256 in `manifest.json`, written to a temporary
name, fsynced and renamed (PyTorch DCP's pattern). A checkpoint counts as committed when its
manifest exists and its files all have the listed sizes; anything else is partial, skipped with a
warning and removed once a newer checkpoint is committed. Before anything is loaded from it, its
files are checked against the manifest's sha256 (`verify`, and `download` for remote ones).

Remote checkpoints (`s3://bucket/prefix`) are written to a local staging folder, uploaded, and
the manifest is uploaded last, after every upload succeeded. DeepSpeed unpickles its files: the
hashes catch damage, not an attacker who can also rewrite the manifest, so use trusted locations.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

from data_pipeline.urls import basename, is_s3_url, join_url, split_s3_url

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


class CheckpointError(ValueError):
    """A committed checkpoint whose files do not match its manifest (damaged or replaced)."""


def _client():
    # Every S3 call waits out an outage up to the storage deadline, then fails naming the URL.
    from data_pipeline.storage import patient_s3_client

    return patient_s3_client()


def _list_sizes(folder: str) -> dict[str, int]:
    """Relative path -> size of every file under a local folder (the manifest excluded)."""
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != MANIFEST and not rel.endswith(".tmp"):
                sizes[rel] = os.path.getsize(path)
    return sizes


def _sha256(path: str, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(folder: str) -> dict[str, tuple[int, str]]:
    """Relative path -> (size, sha256) of every file under a local folder (the manifest excluded),
    each file and then each folder fsynced: a manifest written after this never points at data
    still in the page cache."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != MANIFEST and not rel.endswith(".tmp"):
                files[rel] = (os.path.getsize(path), _sha256(path, sync=True))
        _fsync_folder(root)
    return files


def manifest_for(step: int, files: dict[str, tuple[int, str]], extra: dict[str, Any]) -> dict:
    return {
        "step": step,
        "files": {rel: size for rel, (size, _) in files.items()},
        "sha256": {rel: digest for rel, (_, digest) in files.items()},
        **extra,
    }


def write_manifest(
    folder: str,
    step: int,
    extra: dict[str, Any],
    files: dict[str, tuple[int, str]] | None = None,
) -> dict[str, Any]:
    """Commit a complete local checkpoint folder (rank 0, after all ranks finished writing and
    every node sealed its files)."""
    manifest = manifest_for(step, seal(folder) if files is None else files, extra)
    _write_json(folder, MANIFEST, manifest)
    _fsync_folder(os.path.dirname(os.path.abspath(folder)))  # the checkpoint's own entry
    return manifest


def _write_json(location: str, name: str, record: dict[str, Any]) -> None:
    """`record` as `<location>/<name>`: one S3 put, or locally a temporary file fsynced and
    renamed over it (a reader never sees half of it), the folder fsynced."""
    body = json.dumps(record, indent=1, sort_keys=True)
    if is_s3_url(location):
        bucket, prefix = split_s3_url(location)
        _client().put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body.encode())
        return
    tmp = os.path.join(location, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(location, name))
    _fsync_folder(location)


def _read_json(location: str, name: str) -> dict[str, Any] | None:
    """`<location>/<name>` (local or S3) parsed, or None when it is missing or unreadable."""
    try:
        if is_s3_url(location):
            bucket, prefix = split_s3_url(location)
            body = _client().get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()
            return json.loads(body)
        with open(os.path.join(location, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
    except Exception as e:  # botocore's NoSuchKey and friends
        if type(e).__name__ in ("NoSuchKey", "ClientError"):
            return None
        raise


def _delete(location: str, name: str) -> None:
    """Remove `<location>/<name>` (local or S3) if it is there."""
    if is_s3_url(location):
        bucket, prefix = split_s3_url(location)
        _client().delete_object(Bucket=bucket, Key=f"{prefix}/{name}")
    elif os.path.exists(os.path.join(location, name)):
        os.remove(os.path.join(location, name))


def upload_files(folder: str, url: str, files: dict[str, Any]) -> None:
    """Upload checkpoint files (one process per node uploads what its node wrote); raises on the
    first failure, so the manifest is never put."""
    client = _client()
    bucket, prefix = split_s3_url(url)
    for rel in files:
        client.upload_file(os.path.join(folder, rel), bucket, f"{prefix}/{rel}")


def put_manifest(url: str, manifest: dict[str, Any]) -> None:
    """Commit a remote checkpoint: the manifest is uploaded after every file it lists."""
    _write_json(url, MANIFEST, manifest)


def uncommit(location: str) -> None:
    """Remove a checkpoint's manifest (before its files are rewritten or deleted)."""
    _delete(location, MANIFEST)


_UNHASHED_WARNED: set[str] = set()


def _check_file(location: str, manifest: dict[str, Any], rel: str, path: str) -> None:
    if "sha256" not in manifest:
        # Written before manifests carried hashes: refusing would strand every older run, and the
        # manifest is what is trusted either way (one who can rewrite it can rewrite its hashes).
        if location not in _UNHASHED_WARNED:
            _UNHASHED_WARNED.add(location)
            logger.warning(
                "checkpoint %s: its manifest has no sha256 (an older soho_scale wrote it): only "
                "the file sizes are checked",
                location,
            )
        return
    expected = manifest["sha256"].get(rel)
    if expected is None:
        raise CheckpointError(f"checkpoint {location}: the manifest has no sha256 for {rel}")
    try:
        actual = _sha256(path)
    except OSError as e:
        raise CheckpointError(f"checkpoint {location}: {rel} is unreadable ({e})") from None
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {location}: {rel} does not match the sha256 in its manifest"
        )


def read_local_manifest(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, MANIFEST)) as f:
        return json.load(f)


def verify(folder: str, location: str | None = None) -> dict[str, Any]:
    """Check every file of a local checkpoint folder against its manifest's sizes and sha256;
    returns the manifest, or raises CheckpointError naming the first bad file."""
    location = location or folder
    try:
        manifest = read_local_manifest(folder)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {location}: unreadable manifest ({e})") from None
    for rel, size in manifest["files"].items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            raise CheckpointError(f"checkpoint {location}: {rel} is missing or truncated")
        _check_file(location, manifest, rel, path)
    return manifest


def download(url: str, folder: str) -> dict[str, Any]:
    """Fetch a committed remote checkpoint into a local folder, each file checked against the
    manifest's sha256 (CheckpointError names the first bad one); the manifest is written last."""
    client = _client()
    bucket, prefix = split_s3_url(url)
    manifest = json.loads(
        client.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read()
    )
    for rel in manifest["files"]:
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        client.download_file(bucket, f"{prefix}/{rel}", path)
        _check_file(url, manifest, rel, path)
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f)
    return manifest


def read_manifest(location: str) -> dict[str, Any] | None:
    return _read_json(location, MANIFEST)


def _actual_sizes(location: str) -> dict[str, int]:
    if not is_s3_url(location):
        return _list_sizes(location)
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
    manifest = read_manifest(location)
    if manifest is None:
        return False
    actual = _actual_sizes(location)
    return all(actual.get(rel) == size for rel, size in manifest["files"].items())


def _scan(root: str) -> tuple[list[Committed], list[Committed]]:
    """(committed, partial) checkpoints under `root`, oldest first."""
    committed, partial = [], []
    for tag in sorted(_tags(root)):
        match = TAG_PATTERN.match(tag)
        if not match:
            continue
        found = Committed(int(match.group(1)), tag, join_url(root, tag))
        (committed if is_complete(found.location) else partial).append(found)
    return committed, partial


def resume_point(root: str, resume: str) -> Committed | None:
    """The checkpoint `checkpoint.resume` names: the newest committed one under `root` (`auto`),
    none (`never`), or the given path, which must be committed."""
    if resume == "never":
        return None
    if resume == "auto":
        found = committed_checkpoints(root)
        return found[-1] if found else None
    location = resume.rstrip("/")
    if not is_complete(location):
        raise ValueError(f"checkpoint.resume: {resume} is not a complete checkpoint (no manifest)")
    match = TAG_PATTERN.match(basename(location))
    return Committed(int(match.group(1)) if match else 0, basename(location), location)


def committed_checkpoints(root: str, warn: bool = True) -> list[Committed]:
    """Complete checkpoints under `root`, oldest first; partial ones are skipped (with a warning)."""
    committed, partial = _scan(root)
    if warn:
        for skipped in partial:
            logger.warning(
                "ignoring partial checkpoint %s (no manifest or missing files)", skipped.location
            )
    return committed


def remove(location: str) -> None:
    """Remove a checkpoint, manifest first: a half-deleted checkpoint must not look complete."""
    uncommit(location)
    if is_s3_url(location):
        client = _client()
        bucket, prefix = split_s3_url(location)
        for rel in _actual_sizes(location):
            client.delete_object(Bucket=bucket, Key=f"{prefix}/{rel}")
        return
    shutil.rmtree(location, ignore_errors=True)
    if not os.path.isdir(parent := os.path.dirname(location)):
        return
    # its conversions for other numbers of ranks (`<tag>_universal_for<N>`, local roots)
    tag = os.path.basename(location)
    for name in os.listdir(parent):
        if name.startswith(f"{tag}_universal_for"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def prune(root: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` committed checkpoints and the best one (`BEST`),
    and the partial ones older than the newest committed (saves that were interrupted; nothing
    can still be writing them, since saves run in step order). Partial ones newer than it are
    left: the next save of that step replaces them."""
    committed, partial = _scan(root)
    if not committed:
        return
    newest = committed[-1].step
    best = (read_best(root) or {}).get("step")
    old = [c for c in committed[: -max(keep_last, 1)] if c.step != best]
    for gone in old + [p for p in partial if p.step < newest]:
        remove(gone.location)


# ---- the best checkpoint of a run that evaluates while it trains (periodic_eval) ------------

BEST = "best.json"  # beside the checkpoints: {step, metric, value, location}


def write_best(root: str, record: dict[str, Any]) -> None:
    """Record the best checkpoint so far (rank 0, after that checkpoint is committed)."""
    if not is_s3_url(root):
        os.makedirs(root, exist_ok=True)
    _write_json(root, BEST, record)


def read_best(root: str) -> dict[str, Any] | None:
    """The best-checkpoint record under `root`, or None when the run keeps none."""
    return _read_json(root, BEST)


def clear_best(root: str) -> None:
    """Forget a best record a previous run of this checkpoint folder left (a fresh start)."""
    _delete(root, BEST)
