"""soho_scale.secrets: the one definition of a secret, and redaction."""

from __future__ import annotations

import os
import threading

from soho_scale.secrets import has_credentials, is_secret_name, redact, secret_values


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
