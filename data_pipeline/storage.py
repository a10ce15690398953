"""Where shards live: S3-compatible object storage or a local folder.

The endpoint comes from `S3_ENDPOINT_URL` (unset: AWS itself); credentials come only from the
standard AWS chain (environment, ~/.aws, instance role) and are never read from job specs nor
logged. `LocalS3Server` runs the `moto_server` S3 API on a free loopback port for tests, the demo
and `soho-scale data s3-local`; `describe_dataset` summarises a shard folder's `index.json`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

ENDPOINT_ENV = "S3_ENDPOINT_URL"
INDEX_BASENAME = "index.json"


# One exception class for every user-fixable data problem, so the CLI handles them alike.
from data_pipeline.shards import DataError  # noqa: E402

__all__ = ["DataError"]


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise DataError(f"{url}: not an s3://bucket/prefix URL")
    return parsed.netloc, parsed.path.strip("/")


def join_url(base: str, name: str) -> str:
    """Join a shard folder (local path or s3:// URL) and a file name."""
    if is_s3_url(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3Server:
    """`moto_server` (S3 API over HTTP) on 127.0.0.1, as a context manager.

    On enter: starts the server on a free (or the given) port, waits until it answers, creates the
    buckets, sets `S3_ENDPOINT_URL` and dummy AWS credentials when none are set. On exit: stops
    the server and restores the environment.
    """

    def __init__(
        self, buckets: Sequence[str] = (), port: int | None = None, start_timeout_s: float = 30.0
    ) -> None:
        self.buckets = list(buckets)
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        self._saved_env: dict[str, str | None] = {}

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalS3Server:
        executable = os.path.join(os.path.dirname(sys.executable), "moto_server")
        if not os.path.isfile(executable):
            raise DataError(f"{executable}: not found; install moto[server] in this environment")
        self.port = self.port or free_port()
        self.process = subprocess.Popen(
            [executable, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_until_up()
        env = {ENDPOINT_ENV: self.endpoint_url}
        if not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")):
            # moto accepts any signature; boto3 needs some credentials to sign at all.
            env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
        env.setdefault("AWS_DEFAULT_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        for key, value in env.items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        client = s3_client()
        for bucket in self.buckets:
            client.create_bucket(Bucket=bucket)
        return self

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise DataError(f"moto_server on port {self.port} exited at start (port in use?)")
            try:
                urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1).close()
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise DataError(
            f"moto_server at {self.endpoint_url} did not answer within {self.start_timeout_s:.0f} s"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __exit__(self, *exc: object) -> None:
        self.stop()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}


def run_local_s3(port: int | None = None, buckets: Sequence[str] = ()) -> None:
    """`soho-scale data s3-local`: serve S3 on loopback until Ctrl-C."""
    with LocalS3Server(buckets=buckets, port=port) as server:
        print(f"S3 API at {server.endpoint_url} (buckets: {', '.join(buckets) or 'none'})")
        print(
            f"export {ENDPOINT_ENV}={server.endpoint_url} AWS_ACCESS_KEY_ID=testing "
            "AWS_SECRET_ACCESS_KEY=testing   # Ctrl-C stops the server",
            flush=True,
        )
        try:
            while server.process is not None and server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


def list_dataset(url: str) -> None:
    """`soho-scale data ls URL`: print the dataset summary as JSON."""
    summary = describe_dataset(url)
    print(json.dumps(summary, indent=2))
