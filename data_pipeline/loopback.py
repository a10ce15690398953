"""Services on loopback for tests, the demo and local runs: a free port, and `LocalS3Server`,
the `moto_server` S3 API on 127.0.0.1 (`soho-scale data s3-local` runs one by hand)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from data_pipeline.errors import DataError
from data_pipeline.storage import ENDPOINT_ENV, s3_client


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
