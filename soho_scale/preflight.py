"""Pre-flight checks for a job, each ending in PASS or FAIL with the fix.

Object storage reachable and every stream's shards present; the initial weights present
(`cnn_init`, `init_from`); checkpoint location writable (a probe file or object, deleted again);
MLflow reachable; /dev/shm large enough; no stale streaming or DeepSpeed shared memory; enough
GPUs per node. `soho-scale plan` (soho_scale/plan.py) runs them; `validate` runs the init_from one.
No credential's value is ever put into a check's text (`soho_scale.secrets.redact`).
"""

from __future__ import annotations

import base64
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

from data_pipeline.live_files import live_paths, remove_files
from data_pipeline.urls import is_s3_url, split_s3_url
from soho_scale.secrets import redact, split_credentials

STREAMING_SHM = re.compile(
    r"^\d{6}_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|resume"
    r"|epoch_shape|epoch_data)$"
)
# DeepSpeed's CPU accelerator all-reduce buffers, left behind by ranks that were killed.
DEEPSPEED_SHM = re.compile(r"^deepspeed_allreduce_buffer_")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


# ---- storage -------------------------------------------------------------------------------


def _storage_failure(exc: Exception) -> tuple[str, str]:
    """(what happened, the fix) for a boto error; unreachable endpoints named as such."""
    from botocore.exceptions import ClientError, NoCredentialsError

    endpoint = redact(os.environ.get("S3_ENDPOINT_URL") or "AWS S3 (S3_ENDPOINT_URL unset)")
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials found", (
            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role"
        )
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "?")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"access denied ({code}) at {endpoint}", "check the AWS credentials and policy"
        return f"{code} at {endpoint}", "check the bucket name in the URL (does the bucket exist?)"
    return f"endpoint {endpoint} unreachable ({type(exc).__name__})", (
        "start the S3 server or set S3_ENDPOINT_URL to a reachable endpoint"
    )


def check_buckets(urls: list[str], client: Any) -> tuple[list[Check], set[str]]:
    """One HEAD per bucket; returns the checks and the buckets that answered."""
    from botocore.exceptions import BotoCoreError, ClientError

    checks, good = [], set()
    for bucket in sorted({split_s3_url(u)[0] for u in urls}):
        try:
            client.head_bucket(Bucket=bucket)
        except (BotoCoreError, ClientError) as e:
            what, fix = _storage_failure(e)
            checks.append(Check(f"object storage s3://{bucket}", False, what, fix))
            continue
        good.add(bucket)
        checks.append(Check(f"object storage s3://{bucket}", True, "reachable"))
    return checks, good


def check_stream(url: str, client: Any, task: str | None = None) -> tuple[Check, int | None]:
    """index.json readable, its shards' columns the ones a `task` job reads, and every shard it
    lists present with its size; (check, samples)."""
    from data_pipeline.errors import DataError
    from data_pipeline.storage import read_index, shard_files, stored_shard_sizes
    from data_pipeline.task_columns import index_columns_problem

    name = f"stream {url}"
    try:
        index = read_index(url, client)
        present = stored_shard_sizes(url, index, client)
    except DataError as e:
        return Check(name, False, str(e), "fix the stream URL or rewrite the shards"), None
    samples = sum(shard["samples"] for shard in index["shards"])
    problem = index_columns_problem(index, task) if task else None
    if problem:
        return Check(name, False, problem, "point the job at its task's shards"), samples
    files = shard_files(index)
    missing = [f["basename"] for f in files if f["basename"] not in present]
    wrong = [
        f"{f['basename']} ({present[f['basename']]} bytes, index says {f['bytes']})"
        for f in files
        if f["basename"] in present and present[f["basename"]] != f["bytes"]
    ]
    if missing or wrong:
        problems = [f"shard {b} listed in index.json is missing" for b in missing[:3]]
        problems += [f"shard {w} has the wrong size" for w in wrong[:3]]
        more = len(missing) + len(wrong) - len(problems)
        detail = "; ".join(problems) + (f" (and {more} more)" if more else "")
        fix = "restore the shard files or re-run `soho-scale data convert` for this dataset"
        return Check(name, False, detail, fix), samples
    return Check(name, True, f"{samples} samples in {len(files)} shards"), samples


def check_cnn_init(value: str | None, client: Any) -> Check:
    """The ResNet weights `model.overrides.cnn_init` names exist (file, s3 object, hub cache)."""
    from soho_scale.model.config import RANDOM_INIT
    from soho_scale.pretrained import resolve_cnn_weights

    name = "CNN weights (model.overrides.cnn_init)"
    fix = "put the file where it is named, or point cnn_init at a file or s3:// URL"
    if value in (None, RANDOM_INIT):
        return Check(name, True, "random initialisation")
    try:
        source = resolve_cnn_weights(value)
    except ValueError as e:
        return Check(name, False, str(e), fix)
    if is_s3_url(source):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3_url(source)
        try:
            size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        except (BotoCoreError, ClientError) as e:
            what, _ = _storage_failure(e)
            return Check(name, False, f"{source}: {what}", fix)
    elif os.path.isfile(source):
        size = os.path.getsize(source)
    else:
        return Check(name, False, f"{source}: no such file", fix)
    return Check(name, True, f"{value}: {source} ({format_bytes(size)})")


def check_init_from(source: str) -> Check:
    """`model.init_from` names weights that exist: a file, a checkpoint, or a job's checkpoint
    folder holding a committed one (the newest is used)."""
    from soho_scale.engine.weights import WeightsError, resolve_init_from

    name = "initial weights (model.init_from)"
    fix = "run the job that writes them, or point model.init_from at a weights file or checkpoint"
    try:
        resolved = resolve_init_from(source)
    except WeightsError as e:
        return Check(name, False, str(e), fix)
    except Exception as e:  # storage unreachable, no credentials
        return Check(name, False, f"{source}: cannot be checked ({type(e).__name__})", fix)
    return Check(name, True, resolved if resolved == source else f"{source}: newest {resolved}")


def check_checkpoint_location(location: str, client: Any) -> Check:
    """Write and delete a probe file (local) or object (s3://) where checkpoints will go."""
    name = f"checkpoint location {location}"
    probe = f".soho-plan-probe-{uuid.uuid4().hex}"
    if is_s3_url(location):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = split_s3_url(location)
        key = f"{prefix}/{probe}" if prefix else probe
        try:
            client.put_object(Bucket=bucket, Key=key, Body=b"")
            client.delete_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError) as e:
            what, fix = _storage_failure(e)
            return Check(name, False, f"cannot write a probe object: {what}", fix)
        return Check(name, True, "writable (probe object put and deleted)")
    # The folder may not exist yet (the trainer creates it): probe its nearest existing parent.
    folder = os.path.abspath(location)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        if os.path.exists(folder):
            return Check(name, False, f"{folder} is a file", "point checkpoint.dir at a folder")
        folder = os.path.dirname(folder)
    path = os.path.join(folder, probe)
    try:
        with open(path, "wb"):
            pass
        os.remove(path)
    except OSError as e:
        return Check(
            name, False, f"cannot write in {folder} ({e.strerror})", "choose a writable folder"
        )
    created = "" if folder == os.path.abspath(location) else f" (will be created under {folder})"
    return Check(name, True, "writable" + created)


# ---- tracking, shared memory, GPUs ---------------------------------------------------------


def check_mlflow(timeout_s: float) -> Check:
    """MLFLOW_TRACKING_URI answers (http/https); a local store needs no server."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    name = "MLflow"
    if not uri:
        return Check(name, True, "MLFLOW_TRACKING_URI unset: local sqlite store in the run folder")
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme not in ("http", "https"):
        return Check(name, True, f"{scheme or 'file'} store, no server to reach")
    shown = redact(uri)
    # As MLflow's client authenticates: a token, else basic auth from the URI's user:password
    # or MLFLOW_TRACKING_USERNAME/PASSWORD.
    base, user, password = split_credentials(uri)
    base = base.rstrip("/")
    user = user or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = password or os.environ.get("MLFLOW_TRACKING_PASSWORD")
    headers = {}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"]
    elif user or password:
        pair = f"{user or ''}:{password or ''}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    status = None
    for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        try:
            request = urllib.request.Request(base + path, headers=headers)
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                status = response.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, OSError) as e:
            reason = redact(str(getattr(e, "reason", e)))
            return Check(
                name,
                False,
                f"{shown} unreachable ({reason})",
                "start the tracking server, fix MLFLOW_TRACKING_URI, or unset it for a local store",
            )
        if status == 200:
            return Check(name, True, f"{shown} answers")
    if status in (401, 403):
        return Check(
            name,
            False,
            f"{shown} rejected the request ({status})",
            "set MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD",
        )
    return Check(
        name,
        False,
        f"{shown} answered {status}",
        "check that MLFLOW_TRACKING_URI is an MLflow server",
    )


def check_shm(needed: int, shm_dir: str = "/dev/shm") -> Check:
    name = f"shared memory {shm_dir}"
    try:
        stat = os.statvfs(shm_dir)
    except OSError as e:
        return Check(name, False, f"cannot stat ({e.strerror})", "mount a tmpfs at /dev/shm")
    free = stat.f_bavail * stat.f_frsize
    detail = f"{format_bytes(free)} free, about {format_bytes(needed)} needed per node"
    if free >= needed:
        return Check(name, True, detail)
    return Check(
        name,
        False,
        detail,
        "enlarge /dev/shm (docker --shm-size, Kubernetes emptyDir medium: Memory) "
        "or lower data.workers / batch.micro_batch_per_rank",
    )


def find_stale_shm(shm_dir: str = "/dev/shm") -> list[str]:
    """Our streaming/DeepSpeed shared-memory files that no live process maps or holds open."""
    try:
        names = sorted(os.listdir(shm_dir))
    except OSError:
        return []
    candidates = [
        os.path.join(shm_dir, n)
        for n in names
        if (STREAMING_SHM.match(n) or DEEPSPEED_SHM.match(n))
        and os.stat(os.path.join(shm_dir, n)).st_uid == os.getuid()
    ]
    if not candidates:
        return []
    live = live_paths()
    return [path for path in candidates if path not in live]


def check_stale_shm(shm_dir: str = "/dev/shm") -> Check:
    name = "stale shared memory"
    stale = find_stale_shm(shm_dir)
    if not stale:
        return Check(name, True, "none")
    shown = ", ".join(os.path.basename(p) for p in stale[:3]) + (" ..." if len(stale) > 3 else "")
    size = sum(os.path.getsize(p) for p in stale if os.path.exists(p))
    return Check(
        name,
        False,
        f"{len(stale)} file(s), {format_bytes(size)}, in {shm_dir} that no live process uses "
        f"({shown}); they hold memory, and stale streaming ones make a reused cache folder fail",
        "run `soho-scale plan --clean-shm` (removes only files no live process uses)",
    )


def clean_stale_shm(shm_dir: str = "/dev/shm") -> list[str]:
    return remove_files(find_stale_shm(shm_dir))


def check_gpus(ranks_per_node: int) -> Check:
    import torch

    name = "GPUs per node"
    if not torch.cuda.is_available():
        return Check(name, True, f"no GPU: {ranks_per_node} CPU ranks (gloo)")
    count = torch.cuda.device_count()
    detail = f"{count} visible, {ranks_per_node} ranks per node"
    if count >= ranks_per_node:
        return Check(name, True, detail)
    return Check(
        name,
        False,
        detail,
        f"run on nodes with {ranks_per_node} GPUs or set resources.procs_per_node={count} "
        f"(or --gpus-per-node {count}) with a global batch it divides",
    )


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
