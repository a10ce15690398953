"""Fixtures for engine tests: pre-training shards on a real loopback S3 server, job files,
a real MLflow tracking server, and a helper that runs `soho-scale train` as a user would."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from PIL import Image, ImageDraw

from data_pipeline.loopback import LocalS3Server, free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_SAMPLES = 48  # 3 optimizer steps per epoch at global batch 16
SECRET = "planted-secret-Zq81xK0vY7"  # must never appear in logs, params or artifacts
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}


def _jpeg(colour: str, shape: str, size: tuple[int, int]) -> bytes:
    image = Image.new("RGB", size, (240, 240, 240))
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="package")
def s3():
    with LocalS3Server(buckets=["soho-test"]) as server:
        os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET  # moto accepts any credentials
        yield server


@pytest.fixture(scope="package")
def pretrain_shards(s3) -> str:
    from streaming import MDSWriter

    rng = random.Random(0)
    url = "s3://soho-test/pretrain"
    columns = {
        "image": "bytes",
        "captions": "json",
        "source": "str",
        "split": "str",
        "image_id": "str",
    }
    with MDSWriter(
        out=url, columns=columns, hashes=["sha1", "xxh64"], size_limit=1 << 16
    ) as writer:
        for i in range(NUM_SAMPLES):
            colour, shape = rng.choice(sorted(COLOURS)), rng.choice(["square", "circle"])
            size = rng.choice([(64, 48), (48, 64), (64, 64)])
            writer.write(
                {
                    "image": _jpeg(colour, shape, size),
                    "captions": [f"a {colour} {shape}", f"one {shape} that is {colour}"],
                    "source": "test",
                    "split": "train",
                    "image_id": str(i),
                }
            )
    return url


@pytest.fixture
def make_job(tmp_path, pretrain_shards):
    """Write a tiny pre-training job (the demo job, shrunk) and return its path."""

    def make(name: str = "job", **changes) -> str:
        with open(os.path.join(REPO, "jobs/demo/pretrain.yaml")) as f:
            spec = yaml.safe_load(f)
        spec["name"] = name
        spec["data"]["streams"] = [{"remote": pretrain_shards}]
        spec["data"]["image"] = {"min_size": 48, "max_size": 64, "square": False}
        spec["data"]["workers"] = 1
        spec["batch"] = {"micro_batch_per_rank": 4, "global_batch": 16}
        spec["schedule"] = {"warmup_steps": 1, "steps": 6, "decay_steps": [], "gamma": 0.1}
        spec["checkpoint"] = {
            "dir": str(tmp_path / f"{name}-ckpt"),
            "interval_steps": 2,
            "keep_last": 5,
            "resume": "auto",
        }
        spec["tracking"]["log_every"] = 1
        for dotted, value in changes.items():
            node = spec
            *parents, leaf = dotted.split("__")
            for key in parents:
                node = node[key]
            node[leaf] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return str(path)

    return make


def train_command(job: str, run_dir: str, nproc: int, *overrides: str) -> list[str]:
    """`soho-scale train`, each rank recording its samples and losses (`record`)."""
    return [
        sys.executable,
        "-m",
        "soho_scale.cli",
        "train",
        job,
        "tracking.record_samples=true",
        *overrides,
        "--nproc",
        str(nproc),
        "--run-dir",
        run_dir,
    ]


def run_train(
    job: str,
    run_dir: str,
    nproc: int = 2,
    *overrides: str,
    env: dict | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        train_command(job, run_dir, nproc, *overrides),
        env=full_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_train(
    job: str, run_dir: str, nproc: int = 2, *overrides: str, env: dict | None = None
) -> subprocess.Popen:
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    log = open(os.path.join(os.path.dirname(run_dir), os.path.basename(run_dir) + ".log"), "w")
    return subprocess.Popen(
        train_command(job, run_dir, nproc, *overrides),
        env=full_env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_steps(run_dir: str, steps: int, timeout: float = 300) -> None:
    """Until the run has logged `steps` optimizer steps (tracking.log_every=1)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    wait_for(
        lambda: os.path.exists(path) and len(metrics_lines(run_dir)) >= steps,
        timeout,
        f"{steps} steps in {run_dir}",
    )


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kill `proc` and every process under it (the launcher runs in a session of its own)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for process in [psutil.Process(proc.pid), *tree] if proc.poll() is None else tree:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(tree, timeout=60)


def record(run_dir: str, rank: int, start: int) -> dict:
    with open(os.path.join(run_dir, f"record_rank{rank}_from{start}.json")) as f:
        return json.load(f)


def metrics_lines(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="package")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=open(root / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # No GenAI job runner: it leaves a store folder in /dev/shm behind every server.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(up, 120, "mlflow server")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
