"""soho_scale.secrets: the one definition of a secret, and redaction."""

from __future__ import annotations

import base64
import http.server
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from soho_scale.secrets import (
    has_credentials,
    is_secret_name,
    redact,
    secret_values,
    split_credentials,
)


def test_secret_names_and_url_credentials():
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME",
                 "my_api_key", "HF_TOKEN"):  # fmt: skip
        assert is_secret_name(name), name
    for name in ("S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "NCCL_SOCKET_IFNAME", "AWS_REGION"):
        assert not is_secret_name(name), name
    assert has_credentials("https://user:pw@mlflow.example.com/")
    assert not has_credentials("https://mlflow.example.com/") and not has_credentials("plain")


def test_redact_masks_secret_values_and_url_userinfo():
    environ = {"MLFLOW_TRACKING_TOKEN": "tok-12345", "AWS_REGION": "us-east-1", "X_TOKEN": "1"}
    text = "token tok-12345 at http://alice:pw@host:5000/x in us-east-1, 1 time"
    assert redact(text, environ) == "token *** at http://***@host:5000/x in us-east-1, 1 time"
    assert secret_values(environ) == {"tok-12345"}  # too short to mask: "1"


def test_secret_values_while_another_thread_changes_the_environment():
    # MLflow's background thread sets and deletes variables (e.g. _MLFLOW_TELEMETRY_SESSION_ID)
    # while the trainer redacts its params.
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            os.environ[f"SOHO_TEST_SESSION_{i % 50}"] = "churning-value"
            os.environ.pop(f"SOHO_TEST_SESSION_{(i + 25) % 50}", None)
            i += 1

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for _ in range(3000):
            redact("nothing secret here")
    finally:
        stop.set()
        thread.join()
        for i in range(50):
            os.environ.pop(f"SOHO_TEST_SESSION_{i}", None)


# ---- credentials inside URLs -----------------------------------------------------------------

MLFLOW_USER, MLFLOW_PASSWORD = "probeuser", "probe-secret-XYZ41"
S3_USER, S3_PASSWORD = "s3probeuser", "s3-probe-secret-QQ72"
PROBES = (MLFLOW_USER, MLFLOW_PASSWORD, S3_USER, S3_PASSWORD, "sig-probe-77", "user-file-pw-5")
REPO = Path(__file__).resolve().parent.parent
JOB = "jobs/demo/pretrain.yaml"


def assert_no_probe(text: str, where: str = "") -> None:
    assert [p for p in PROBES if p in text] == [], where


def test_redact_masks_userinfo_and_credential_query_parameters():
    cases = {
        "see http://u:p@ss@host:5000/x and bob@example.com": (
            "see http://***@host:5000/x and bob@example.com"
        ),
        '{"uri": "https://user:pw@mlflow.example"}': '{"uri": "https://***@mlflow.example"}',
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12&v=1": (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&v=1"
        ),
        "http://host/api?access_token=zz9#top": "http://host/api?access_token=***#top",
        # RFC 3986 allows ' ( ) ! $ * in a password unencoded
        "http://alice:Pa(ss)w0'rd!@127.0.0.1:1 unreachable": "http://***@127.0.0.1:1 unreachable",
        "https://h/?auth=abcdefgh&v=2": "https://h/?auth=***&v=2",
        "https://h/cb#access_token=abc123&x=1": "https://h/cb#access_token=***&x=1",
        "https://maps.example/api?key=AIzaXYZ": "https://maps.example/api?key=***",
    }
    for text, masked in cases.items():
        assert redact(text, {}) == masked
        assert has_credentials(text) and not has_credentials(masked)
    assert is_secret_name("MLFLOW_CRYPTO_KEK_PASSPHRASE")
    # The password of a URL in any variable is masked on its own too (decoded or not).
    environ = {"MLFLOW_TRACKING_URI": "http://me:p%40ss-word@host"}
    assert redact("auth p@ss-word / p%40ss-word", environ) == "auth *** / ***"
    assert split_credentials("http://u%40x:p@ss@[::1]:50/a?b=1") == (
        "http://[::1]:50/a?b=1", "u@x", "p@ss"
    )  # fmt: skip
    assert split_credentials("s3://bucket/key") == ("s3://bucket/key", None, None)


class _BasicAuthServer(http.server.ThreadingHTTPServer):
    """An HTTP endpoint that answers 200 only to MLflow's probe credentials, else 401."""

    def __init__(self) -> None:
        expected = base64.b64encode(f"{MLFLOW_USER}:{MLFLOW_PASSWORD}".encode()).decode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                ok = self.headers.get("Authorization") == f"Basic {expected}"
                self.send_response(200 if ok else 401)
                self.end_headers()
                self.wfile.write(b"OK" if ok else b"")

            def log_message(self, *args) -> None: ...

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{MLFLOW_USER}:{MLFLOW_PASSWORD}@127.0.0.1:{self.server_port}"


@pytest.fixture
def probe_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("DS_ENV_FILE", "DS_ACCELERATOR", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name in ("USERNAME", "PASSWORD"):
        monkeypatch.delenv(f"MLFLOW_TRACKING_{name}", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # moto accepts any
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return monkeypatch


@pytest.mark.slow
def test_plan_and_validate_with_credentials_in_urls(probe_env, tmp_path, capfd):
    from data_pipeline.loopback import LocalS3Server, free_port
    from soho_scale.cli import main

    spec = yaml.safe_load((REPO / JOB).read_text())
    spec["data"]["streams"] = [{"remote": "s3://soho-probe/none"}]
    spec["checkpoint"]["dir"] = "s3://soho-probe/checkpoints"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    plan = [str(job), "--shm-dir", str(tmp_path), "--timeout", "2"]
    server = _BasicAuthServer()
    try:
        probe_env.setenv("MLFLOW_TRACKING_URI", server.url)
        with LocalS3Server(buckets=["soho-probe"]) as s3:
            probe_env.setenv(
                "S3_ENDPOINT_URL", f"http://{S3_USER}:{S3_PASSWORD}@127.0.0.1:{s3.port}"
            )
            main(["plan", *plan])
            out = capfd.readouterr()
            # MLflow's check authenticated with the URI's user:password; storage answered.
            assert "PASS  MLflow: http://***@127.0.0.1" in out.out, out.out
            assert "PASS  object storage s3://soho-probe" in out.out
            assert "FAIL  stream s3://soho-probe/none" in out.out
            assert_no_probe(out.out + out.err, "plan")
            main(["plan", *plan, "--json"])
            out = capfd.readouterr()
            assert_no_probe(out.out + out.err, "plan --json")
        # Storage unreachable: the endpoint is named, without its user:password.
        probe_env.setenv(
            "S3_ENDPOINT_URL", f"http://{S3_USER}:{S3_PASSWORD}@127.0.0.1:{free_port()}"
        )
        main(["plan", *plan, "--timeout", "1"])
        out = capfd.readouterr()
        assert "unreachable" in out.out and "http://***@127.0.0.1" in out.out
        assert_no_probe(out.out + out.err, "plan, storage down")
    finally:
        server.shutdown()
    # A value a user typed that holds a credential is not echoed by an error line.
    bad = f"model.init_from=http://{S3_USER}:{S3_PASSWORD}@host/w.pt"
    assert main(["validate", JOB, bad]) == 2
    out = capfd.readouterr()
    assert "model.init_from: 'http://***@host/w.pt' holds credentials" in out.err
    assert_no_probe(out.out + out.err, "validate")


@pytest.mark.slow
def test_launch_keeps_url_credentials_off_command_lines_and_files(probe_env, tmp_path, capfd):
    """The real DeepSpeed runner (pdsh stand-in recording each host's command), the sbatch
    script and the Kubernetes manifest: the URLs travel without their user:password."""
    from soho_scale.launch.submit import launch_main

    shims = tmp_path / "bin"
    shims.mkdir()
    for tool in ("pdsh", "ssh"):
        (shims / tool).write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/{tool}.args"\n')
        (shims / tool).chmod(0o755)
    probe_env.setenv("PATH", f"{shims}:{os.environ['PATH']}")
    probe_env.setenv(
        "MLFLOW_TRACKING_URI", f"http://{MLFLOW_USER}:{MLFLOW_PASSWORD}@mlflow.internal:5000"
    )
    probe_env.setenv("S3_ENDPOINT_URL", f"http://{S3_USER}:{S3_PASSWORD}@storage.internal:9000")
    probe_env.setenv("MLFLOW_ARTIFACTS_URL", "https://b.s3/x?X-Amz-Signature=sig-probe-77")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".deepspeed_env").write_text("MY_SERVICE_URL=https://me:user-file-pw-5@svc:1\n")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 slots=1\nworker-1 slots=1\n")
    run_dir = tmp_path / "run"
    argv = [JOB, "--hostfile", str(hostfile), "--gpus-per-node", "1", "--nodes", "2"]
    assert launch_main([*argv, "--master-addr", "10.0.0.1", "--run-dir", str(run_dir)]) == 0
    remote = (tmp_path / "pdsh.args").read_text()
    assert "export MLFLOW_TRACKING_URI=http://mlflow.internal:5000;" in remote
    assert "export S3_ENDPOINT_URL=http://storage.internal:9000;" in remote
    assert "export MY_SERVICE_URL=https://svc:1;" in remote
    assert "MLFLOW_ARTIFACTS_URL" not in remote  # a presigned URL does not travel at all
    files = {
        "pdsh": remote,
        "ssh": (tmp_path / "ssh.args").read_text(),
        "env file": (run_dir / "deepspeed_env").read_text(),
    }
    out = capfd.readouterr()  # ours and the runner's log ("cmd = pdsh ... export ...")
    assert "MLFLOW_TRACKING_URI propagated without its user:password" in out.out
    files["launch --hostfile output"] = out.out + out.err

    sbatch, manifest = tmp_path / "job.sbatch", tmp_path / "job.k8s.yaml"
    shape = ["--nodes", "2", "--gpus-per-node", "1"]
    assert launch_main([JOB, "--scheduler", "slurm", *shape, "--out", str(sbatch)]) == 0
    # The job keeps the full URI Slurm hands it from the submitting shell; the script holds
    # only the bare one, for a job that inherits none.
    (line,) = [x for x in sbatch.read_text().splitlines() if "MLFLOW_TRACKING_URI" in x]
    assert line.endswith(
        "MLFLOW_TRACKING_URI=http://mlflow.internal:5000; export MLFLOW_TRACKING_URI"
    )
    show = f'set -euo pipefail; {line}; printf %s "$MLFLOW_TRACKING_URI"'
    inherited = os.environ["MLFLOW_TRACKING_URI"]
    for given, seen in ((inherited, inherited), (None, "http://mlflow.internal:5000")):
        child = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        child.update({"MLFLOW_TRACKING_URI": given} if given else {})
        shown = subprocess.run(["bash", "-c", show], env=child, capture_output=True, text=True)
        assert shown.stdout == seen
    argv = [JOB, "--scheduler", "k8s", *shape, "--image", "r/soho:1", "--out", str(manifest)]
    assert launch_main([*argv, "checkpoint.dir=s3://soho-checkpoints/x"]) == 0
    documents = list(yaml.safe_load_all(manifest.read_text()))
    variables = {
        v["name"]: v for v in documents[1]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert variables["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.internal:5000"
    assert variables["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["optional"]
    out = capfd.readouterr()
    files.update(sbatch=sbatch.read_text(), manifest=manifest.read_text())
    files["launch --scheduler output"] = out.out + out.err
    for where, text in files.items():
        assert_no_probe(text, where)


def test_report_against_a_dead_server_is_one_line_without_the_credentials(
    monkeypatch, capsys, tmp_path
):
    from soho_scale.cli import main

    with socket.socket() as s:  # a closed port: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://probeuser:probe-pw-31@127.0.0.1:{port}"
    argv = ["report", "--experiment", "x", "--out", str(tmp_path), "--tracking-uri", uri]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"MLflow at http://***@127.0.0.1:{port}" in err
    assert "probe" not in err
