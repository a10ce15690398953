"""Where shards live: S3-compatible object storage or a local folder.

The endpoint comes from `S3_ENDPOINT_URL` (unset: AWS itself); credentials come only from the
standard AWS chain (environment, ~/.aws, instance role) and are never read from job specs nor
logged. `describe_dataset` summarises a shard folder's `index.json`; `data_pipeline.loopback`
runs a local S3 API for tests and the demo.

`with_deadline` is the one retry of the house for storage outages (shard downloads, checkpoint
transfers): a transient failure (endpoint refusing or dropping connections, timeouts, 5xx,
throttling) is retried with capped exponential backoff and jitter until a total deadline, with one
warning when an outage starts and one when it ends, not a line per attempt.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from data_pipeline import settings
from data_pipeline.errors import DataError
from data_pipeline.mds_index import index_problem
from data_pipeline.urls import is_s3_url, join_url, mask_url_credentials, split_s3_url

logger = logging.getLogger(__name__)

ENDPOINT_ENV = "S3_ENDPOINT_URL"
INDEX_BASENAME = "index.json"
RETRY_FIRST_S = 1.0  # first wait after a failed attempt; doubles each time
RETRY_CAP_S = 30.0  # longest wait: an endpoint that is back is used again within this
# Error codes S3-compatible servers answer when they are overloaded (retried like a 5xx).
_THROTTLING = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestLimitExceeded",
}

T = TypeVar("T")


class StorageUnavailable(DataError):
    """The storage endpoint stayed unreachable past the deadline (one line: what, for how long)."""


# What a client is built from besides its arguments: a change to any of these (a test's or the
# demo's local server, other credentials) gets a new client.
_CLIENT_ENV = (
    ENDPOINT_ENV,
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CA_BUNDLE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)
# A client keeps the credentials it was built with unless they refresh themselves (roles, web
# identity); rebuilt this often, it also picks up keys rotated in a credentials file.
CLIENT_TTL_S = 300.0
_clients: dict[tuple[Any, ...], tuple[float, Any]] = {}
_clients_lock = threading.Lock()


def _forget_clients_in_child() -> None:
    # A forked process builds its own: its parent's pooled connections are not its to use, and a
    # fork taken while another thread built a client would otherwise inherit a held lock.
    global _clients_lock
    _clients_lock = threading.Lock()
    _clients.clear()


os.register_at_fork(after_in_child=_forget_clients_in_child)


def s3_client(timeout_s: float = 60.0, max_attempts: int = 3) -> Any:
    """A boto3 S3 client for `S3_ENDPOINT_URL` (AWS when unset), credentials from the AWS chain.

    One client per process and settings, rebuilt every `CLIENT_TTL_S`: building one costs
    0.1-0.3 s of CPU (botocore parses its endpoint and service models each time) and a checkpoint
    save or resume makes dozens of calls; botocore clients are thread-safe. A forked process
    starts with none."""
    import boto3
    from botocore.config import Config

    key = (timeout_s, max_attempts, tuple(os.environ.get(n) for n in _CLIENT_ENV))
    now = time.monotonic()
    with _clients_lock:
        built, client = _clients.get(key, (0.0, None))
        if client is None or now - built > CLIENT_TTL_S:
            config = Config(
                connect_timeout=timeout_s,
                read_timeout=timeout_s,
                retries={"mode": "standard", "max_attempts": max_attempts},
            )
            client = boto3.session.Session().client(
                "s3", endpoint_url=os.environ.get(ENDPOINT_ENV) or None, config=config
            )
            _clients[key] = (now, client)
        return client


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
        raise DataError(
            f"{url}: storage endpoint {endpoint_label()} unreachable ({mask_url_credentials(str(e))})"
        ) from e


def object_sizes(url: str, client: Any = None, nested: bool = False) -> dict[str, int]:
    """Sizes in bytes of the files directly inside a folder (local or s3://), and with `nested`
    those in its sub-folders too, named relative to it (`part0/shard.00000.mds`: how an index
    merged by streaming's `merge_index` names its shards)."""
    if not is_s3_url(url):
        if not os.path.isdir(url):
            raise DataError(f"{url}: folder not found")
        if not nested:
            return {n: os.path.getsize(os.path.join(url, n)) for n in os.listdir(url)}
        return {
            os.path.relpath(os.path.join(folder, n), url).replace(os.sep, "/"): os.path.getsize(
                os.path.join(folder, n)
            )
            for folder, _, files in os.walk(url)
            for n in files
        }
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
                if nested or "/" not in name:
                    sizes[name] = obj["Size"]
    except (ClientError, BotoCoreError) as e:
        raise DataError(
            f"{url}: cannot list objects at {endpoint_label()} ({mask_url_credentials(str(e))})"
        ) from e
    return sizes


def endpoint_label() -> str:
    """The endpoint for messages, with any user:password in it masked."""
    endpoint = os.environ.get(ENDPOINT_ENV)
    return mask_url_credentials(endpoint) if endpoint else "AWS S3 (S3_ENDPOINT_URL unset)"


def read_index(url: str, client: Any = None) -> dict[str, Any]:
    """The MDSWriter `index.json` of a shard folder (local path or s3:// URL)."""
    index_url = join_url(url, INDEX_BASENAME)
    raw = read_bytes(index_url, client)
    try:
        index = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, 5000 digits, [[[[...
        raise DataError(f"{index_url}: not valid JSON ({str(e)[:100]}); rewrite the shards") from e
    problem = index_problem(index)
    if problem:
        raise DataError(f"{index_url}: {problem}; rewrite the shards")
    return index


def shard_files(index: dict[str, Any]) -> list[dict[str, Any]]:
    """The files a dataset's shards are stored as (compressed file when there is one)."""
    return [shard.get("zip_data") or shard["raw_data"] for shard in index["shards"]]


def stored_shard_sizes(url: str, index: dict[str, Any], client: Any = None) -> dict[str, int]:
    """Sizes of the files in the shard folder `url`, named as its `index` names shards (its
    sub-folders' files too when the index lists shards in them, as a merged index does)."""
    nested = any("/" in file["basename"] for file in shard_files(index))
    return object_sizes(url, client, nested)


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
                "hashes": file["hashes"],
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


def is_transient(error: BaseException) -> bool:
    """An outage or overload worth waiting out; a missing object or a refused credential is not."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as EndpointDown
    from s3transfer.exceptions import RetriesExceededError

    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or error.response.get("Error", {}).get("Code") in _THROTTLING
    return isinstance(
        error, (EndpointDown, HTTPClientError, RetriesExceededError, ConnectionError, TimeoutError)
    )


class _Outage:
    """Calls of this process now waiting out an outage: the first to fail logs the start, the
    last to get through logs the end."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting = 0
        self.since = 0.0

    def began(self, what: str, error: BaseException, deadline_s: float) -> None:
        with self.lock:
            self.waiting += 1
            if self.waiting == 1:
                self.since = time.monotonic()
                logger.warning(
                    "storage endpoint %s unreachable (%s: %s: %s); retrying with backoff for up "
                    "to %.0f s",
                    endpoint_label(),
                    what,
                    type(error).__name__,
                    _first_line(error),
                    deadline_s,
                )

    def ended(self, what: str, recovered: bool) -> None:
        with self.lock:
            self.waiting -= 1
            if self.waiting == 0 and recovered:
                logger.warning(
                    "storage endpoint %s is back after %.0f s (%s)",
                    endpoint_label(),
                    time.monotonic() - self.since,
                    what,
                )


_outage = _Outage()


def _first_line(error: BaseException) -> str:
    # botocore's connection errors quote the endpoint URL, user:password included
    return mask_url_credentials((str(error).splitlines() or [""])[0][:300])


def with_deadline(action: Callable[[], T], what: str, deadline_s: float) -> T:
    """`action()`, retried on transient storage errors with capped exponential backoff and
    jitter until `deadline_s` seconds after its first failure (0: no retry); then
    StorageUnavailable naming `what` (a URL) and the time waited. Other errors pass through."""
    first_failure: float | None = None
    attempt = 0
    while True:
        try:
            result = action()
        except Exception as e:
            if deadline_s <= 0 or not is_transient(e):
                if first_failure is not None:
                    _outage.ended(what, recovered=False)
                raise
            now = time.monotonic()
            if first_failure is None:
                first_failure = now
                _outage.began(what, e, deadline_s)
            waited = now - first_failure
            if waited >= deadline_s:
                _outage.ended(what, recovered=False)
                raise StorageUnavailable(
                    f"{what}: storage endpoint {endpoint_label()} unreachable for {waited:.0f} s, "
                    f"past the {deadline_s:.0f} s deadline ({type(e).__name__}: {_first_line(e)})"
                ) from e
            # Full backoff times a random factor: ranks and workers that failed together do not
            # come back together.
            delay = min(RETRY_CAP_S, RETRY_FIRST_S * 2**attempt) * random.uniform(0.5, 1.0)
            time.sleep(min(delay, deadline_s - waited))
            attempt += 1
            continue
        if first_failure is not None:
            _outage.ended(what, recovered=True)
        return result


class PatientS3:
    """An S3 client (`s3_client`) whose every call waits out outages (`with_deadline`): a
    `get_object` body is read inside the retry, and a paginator's pages are fetched whole."""

    def __init__(self, client: Any, deadline_s: float) -> None:
        self.client = client
        self.deadline_s = deadline_s

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)
        if name == "get_paginator":
            return lambda operation: _PatientPaginator(self, method(operation))

        def call(*args: Any, **kwargs: Any) -> Any:
            def attempt() -> Any:
                result = method(*args, **kwargs)
                if name == "get_object":
                    result["Body"] = io.BytesIO(result["Body"].read())
                return result

            return with_deadline(attempt, _url_of(name, args, kwargs), self.deadline_s)

        return call


class _PatientPaginator:
    def __init__(self, owner: PatientS3, paginator: Any) -> None:
        self.owner, self.paginator = owner, paginator

    def paginate(self, **kwargs: Any) -> list[dict[str, Any]]:
        return with_deadline(
            lambda: list(self.paginator.paginate(**kwargs)),
            _url_of("paginate", (), kwargs),
            self.owner.deadline_s,
        )


def _url_of(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """s3://bucket/key of a client call (keywords, or upload_file/download_file's positions)."""
    if "Bucket" in kwargs:
        return f"s3://{kwargs['Bucket']}/{kwargs.get('Key') or kwargs.get('Prefix', '')}"
    if method == "upload_file" and len(args) >= 3:  # (Filename, Bucket, Key)
        return f"s3://{args[1]}/{args[2]}"
    if len(args) >= 2:  # download_file(Bucket, Key, Filename)
        return f"s3://{args[0]}/{args[1]}"
    return f"{method} at {endpoint_label()}"


def patient_s3_client(deadline_s: float = settings.STORAGE_DEADLINE_S) -> PatientS3:
    """`s3_client()` whose calls ride out storage outages up to `deadline_s`."""
    return PatientS3(s3_client(), deadline_s)
