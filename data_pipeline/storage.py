"""Where shards live: S3-compatible object storage or a local folder.

The endpoint comes from `S3_ENDPOINT_URL` (unset: AWS itself); credentials come only from the
standard AWS chain (environment, ~/.aws, instance role) and are never read from job specs nor
logged. `describe_dataset` summarises a shard folder's `index.json`; `data_pipeline.loopback`
runs a local S3 API for tests and the demo.
"""

from __future__ import annotations

import json
import os
from typing import Any

from data_pipeline.errors import DataError
from data_pipeline.urls import is_s3_url, join_url, split_s3_url

ENDPOINT_ENV = "S3_ENDPOINT_URL"
INDEX_BASENAME = "index.json"


def s3_client(timeout_s: float = 60.0, max_attempts: int = 3) -> Any:
    """A boto3 S3 client for `S3_ENDPOINT_URL` (AWS when unset), credentials from the AWS chain."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
        retries={"mode": "standard", "max_attempts": max_attempts},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=os.environ.get(ENDPOINT_ENV) or None, config=config
    )


def read_bytes(url: str, client: Any = None) -> bytes:
    """Read one file from a local folder or s3://; a missing file raises DataError naming it."""
    if not is_s3_url(url):
        if not os.path.isfile(url):
            raise DataError(f"{url}: file not found (check the dataset path)")
        with open(url, "rb") as f:
            return f.read()
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_url(url)
    try:
        return (client or s3_client()).get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "?")
        raise DataError(
            f"{url}: cannot read ({code}) from {endpoint_label()}; check the URL, bucket and "
            "AWS credentials"
        ) from e
    except BotoCoreError as e:
        raise DataError(f"{url}: storage endpoint {endpoint_label()} unreachable ({e})") from e


def object_sizes(url: str, client: Any = None) -> dict[str, int]:
    """Sizes in bytes of the files directly inside a shard folder (local or s3://)."""
    if not is_s3_url(url):
        if not os.path.isdir(url):
            raise DataError(f"{url}: folder not found")
        return {n: os.path.getsize(os.path.join(url, n)) for n in os.listdir(url)}
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3_url(url)
    prefix = prefix + "/" if prefix else ""
    sizes: dict[str, int] = {}
    try:
        pages = (
            (client or s3_client())
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=prefix)
        )
        for page in pages:
            for obj in page.get("Contents", []):
                name = obj["Key"][len(prefix) :]
                if "/" not in name:
                    sizes[name] = obj["Size"]
    except (ClientError, BotoCoreError) as e:
        raise DataError(f"{url}: cannot list objects at {endpoint_label()} ({e})") from e
    return sizes


def endpoint_label() -> str:
    return os.environ.get(ENDPOINT_ENV) or "AWS S3 (S3_ENDPOINT_URL unset)"


def read_index(url: str, client: Any = None) -> dict[str, Any]:
    """The MDSWriter `index.json` of a shard folder (local path or s3:// URL)."""
    index_url = join_url(url, INDEX_BASENAME)
    raw = read_bytes(index_url, client)
    try:
        index = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{index_url}: not valid JSON ({e}); rewrite the shards") from e
    if index.get("version") != 2 or "shards" not in index:
        raise DataError(f"{index_url}: not an MDS index (version 2 with 'shards' expected)")
    return index


def shard_files(index: dict[str, Any]) -> list[dict[str, Any]]:
    """The files a dataset's shards are stored as (compressed file when there is one)."""
    return [shard.get("zip_data") or shard["raw_data"] for shard in index["shards"]]


def describe_dataset(url: str) -> dict[str, Any]:
    """Shards, samples, bytes and hashes of a shard folder (local path or s3:// URL)."""
    index = read_index(url)
    shards = []
    for shard, file in zip(index["shards"], shard_files(index)):
        shards.append(
            {
                "basename": file["basename"],
                "samples": shard["samples"],
                "bytes": file["bytes"],
                "hashes": file.get("hashes", {}),
            }
        )
    columns = {}
    if index["shards"]:
        first = index["shards"][0]
        columns = dict(zip(first.get("column_names", []), first.get("column_encodings", [])))
    return {
        "url": url,
        "shards": len(shards),
        "samples": sum(s["samples"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "columns": columns,
        "shard_files": shards,
    }
