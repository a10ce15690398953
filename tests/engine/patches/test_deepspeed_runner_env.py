"""soho_scale.engine.patches.deepspeed_runner_env: the env file and the runner's environment that
`soho-scale launch --hostfile` builds carry the settings and keep secrets off remote command
lines."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from soho_scale.engine.patches import deepspeed_runner_env
from soho_scale.engine.patches.deepspeed_runner_env import (
    AUTO_EXPORT_PREFIXES,
    PATCH,
    auto_exported,
)
from soho_scale.launch.environment import deepspeed_env, launcher_environment, write_env_file
from soho_scale.launch.hostfile import runner_command
from soho_scale.secrets import is_secret_name
from tests.engine.conftest import REPO

JOB = "jobs/demo/pretrain.yaml"
TOKEN = "planted-mlflow-token-89"
SETTINGS = {
    "S3_ENDPOINT_URL": "http://storage.internal:9000",
    "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
}


def test_version_in_tested_range():
    assert PATCH.version_problem() is None


def test_fingerprints_unchanged():
    assert PATCH.fingerprint_problems() == []


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A HOME with the user's own ~/.deepspeed_env, one line of it secret; the CWD has none."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".deepspeed_env").write_text("NCCL_IB_DISABLE=1\nMY_API_TOKEN=user-own-secret\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    return home


def test_behaviour_secret_mlflow_variable_stays_off_the_runner_and_the_env_file(home, tmp_path):
    environ = {"MLFLOW_TRACKING_TOKEN": TOKEN, "NCCL_SOCKET_IFNAME": "eth0", **SETTINGS}
    assert deepspeed_runner_env.install()
    values, notes = deepspeed_env(environ)
    env_file = tmp_path / "run" / "deepspeed_env"
    write_env_file(str(env_file), values)
    env, removed = launcher_environment(environ, str(env_file))
    assert removed == ["MLFLOW_TRACKING_TOKEN"]
    assert "MLFLOW_TRACKING_TOKEN" not in env and TOKEN not in env.values()
    assert [name for name in env if auto_exported(name) and is_secret_name(name)] == []
    assert env["NCCL_SOCKET_IFNAME"] == "eth0"  # a non-secret export still travels
    assert env["DS_ENV_FILE"] == str(env_file)
    text = env_file.read_text()
    assert dict(line.split("=", 1) for line in text.splitlines()) == {
        "NCCL_IB_DISABLE": "1",
        **SETTINGS,
        "NCCL_SOCKET_IFNAME": "eth0",  # every NCCL_* setting travels (launch.environment)
    }
    assert TOKEN not in text and "user-own-secret" not in text
    assert any("MY_API_TOKEN" in note for note in notes)


def _record_remote_commands(tmp_path: Path) -> dict[str, str]:
    """pdsh and ssh stand-ins that record the command each host would run; a two-host file."""
    shims = tmp_path / "bin"
    shims.mkdir()
    for tool in ("pdsh", "ssh"):
        (shims / tool).write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/{tool}.args"\n')
        (shims / tool).chmod(0o755)
    (tmp_path / "hosts").write_text("worker-0 slots=1\nworker-1 slots=1\n")
    return {"PATH": f"{shims}:{os.environ['PATH']}"}


def _run_runner(tmp_path: Path, env: dict[str, str]) -> str:
    extra = ["--hostfile", str(tmp_path / "hosts"), "--launcher", "pdsh", "--num_nodes", "2"]
    extra += ["--master_addr", "10.0.0.1"]
    command = runner_command(JOB, [], 1, master_port=29500, extra=extra)
    subprocess.run(command, env=env, cwd=REPO, check=True, capture_output=True, timeout=300)
    return (tmp_path / "pdsh.args").read_text()


@pytest.mark.slow
def test_behaviour_the_real_runner_carries_the_env_file_and_no_secret(home, tmp_path):
    environ = {**os.environ, **_record_remote_commands(tmp_path), **SETTINGS}
    environ["MLFLOW_TRACKING_TOKEN"] = TOKEN
    values, _ = deepspeed_env(environ)
    env_file = tmp_path / "run" / "deepspeed_env"
    write_env_file(str(env_file), values)
    env, _ = launcher_environment(environ, str(env_file))
    remote = _run_runner(tmp_path, env)
    for name, value in {"NCCL_IB_DISABLE": "1", **SETTINGS}.items():
        assert f"export {name}={value};" in remote
    assert TOKEN not in remote and "user-own-secret" not in remote


@pytest.mark.slow
def test_still_needed_the_runner_copies_every_prefixed_variable_secrets_included(home, tmp_path):
    """Without our environment, the runner (CUDA accelerator: NCCL too) puts a secret-named
    variable of each prefix on the remote command line."""
    planted = {
        f"{prefix}_PLANTED_TOKEN": f"planted-{prefix.lower()}" for prefix in AUTO_EXPORT_PREFIXES
    }
    env = {**os.environ, **_record_remote_commands(tmp_path), **planted, "DS_ACCELERATOR": "cuda"}
    remote = _run_runner(tmp_path, env)
    missing = [name for name, value in planted.items() if f"export {name}={value};" not in remote]
    assert missing == [], (
        f"upstream changed: delete/revise {PATCH.module} (the runner no longer copies "
        f"{', '.join(missing)} onto remote command lines)"
    )
