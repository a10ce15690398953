"""Shared fixtures for data_pipeline tests: a private TMPDIR, the synthetic world, its shards,
and a real S3 API server (`moto_server` on a free loopback port)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_pipeline.synthetic import convert_world, write_world

MOTO_SERVER = Path(sys.executable).with_name("moto_server")


@pytest.fixture(scope="session")
def synthetic_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `small` synthetic world (seed 0), written once per session. Treat as read-only."""
    root = tmp_path_factory.mktemp("world")
    write_world(str(root), seed=0, size="small")
    return root


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every dataset of `synthetic_world` converted to MDS: `<root>/<dataset>/<split>/`
    (coco/train2014, vqa/val2014, karpathy/test, nlvr2/dev, snli_ve/train, vg/train, ...)."""
    root = tmp_path_factory.mktemp("shards")
    reports = convert_world(str(synthetic_world), str(root))
    assert all(report["written"] > 0 for report in reports.values())
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a `moto_server` S3 API on 127.0.0.1; sets S3_ENDPOINT_URL and dummy AWS
    credentials in the environment for the session (restored afterwards)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # any HTTP answer means the server is up
            except OSError as e:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {url}; see {log.name}") from e
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("S3_ENDPOINT_URL", url)
            for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
                mp.delenv(name, raising=False)
            yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
