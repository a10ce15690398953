"""soho_scale.engine.patches.deepspeed_launcher: `soho-scale train` starts DeepSpeed's per-node
launcher itself, with the command the `deepspeed` runner would start for one local node."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from soho_scale.engine.patches.deepspeed_launcher import (
    PATCH,
    encode_world_info,
    local_launcher_command,
)
from soho_scale.launch.rank import rank_module_args
from tests.engine.conftest import REPO

RANK_ARGS = rank_module_args("jobs/demo/pretrain.yaml", ["optim.rest.lr=1e-4"], "runs/x")


def test_version_in_tested_range():
    assert PATCH.version_problem() is None


def test_fingerprints_unchanged():
    assert PATCH.fingerprint_problems() == []


@pytest.mark.slow
def test_behaviour_the_command_is_the_runners_for_one_local_node(monkeypatch):
    """The real runner's `main` for `--num_gpus 2` on this machine; when it starts the launcher,
    the command is recorded and a process that exits at once starts instead."""
    from deepspeed.launcher import launch, runner

    world_info = {"localhost": [0, 1, 2]}
    assert encode_world_info(world_info) == runner.encode_world_info(world_info)
    started = []
    real_popen = subprocess.Popen

    def popen(command: list[str], *args, **kwargs) -> subprocess.Popen:
        if "deepspeed.launcher.launch" in command:
            started.append(command)
            command, args, kwargs = [sys.executable, "-c", ""], (), {}
        return real_popen(command, *args, **kwargs)

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # the runner would delete it
    monkeypatch.setattr(subprocess, "Popen", popen)
    runner.main(["--num_gpus", "2", "--master_port", "29511", *RANK_ARGS])
    (theirs,) = started
    ours = local_launcher_command(2, 29511, RANK_ARGS)
    # The runner also passes its defaults of two options, which are the launcher's own defaults
    # (the parsed arguments below are equal).
    defaults = ("--enable_each_rank_log=", "--log_level=")
    assert ours == [arg for arg in theirs if not arg.startswith(defaults)]
    parsed = []
    for command in (ours, theirs):
        assert command[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.launch"]
        monkeypatch.setattr(sys, "argv", command[3:])
        parsed.append(vars(launch.parse_args()))
    assert parsed[0] == parsed[1]
    assert parsed[0]["module"] and parsed[0]["training_script"] == "soho_scale.launch.rank"
    assert parsed[0]["training_script_args"] == RANK_ARGS[2:]
    # launch.main decodes world_info this way
    assert json.loads(base64.urlsafe_b64decode(parsed[0]["world_info"])) == {"localhost": [0, 1]}


def test_behaviour_the_command_is_built_without_importing_deepspeed_or_torch():
    code = (
        "import sys\n"
        "from soho_scale.engine.patches import deepspeed_launcher\n"
        "assert deepspeed_launcher.install()\n"
        "deepspeed_launcher.local_launcher_command(2, 29500, ['--module', 'm'])\n"
        "print(sorted(name for name in ('deepspeed', 'torch') if name in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_still_needed_the_runner_imports_torch_and_deepspeed_before_it_starts_the_launcher():
    """The `deepspeed` command imports its runner module, which imports torch and DeepSpeed
    (seconds, benchmarks/README.md "launcher start-up") before it starts the same launcher."""
    code = (
        "import sys\n"
        "import deepspeed.launcher.runner\n"
        "print(sorted(name for name in ('deepspeed', 'torch') if name in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    if out.stdout.strip().splitlines()[-1] != "['deepspeed', 'torch']":
        pytest.fail(f"upstream changed: the runner starts light; delete/revise {PATCH.module}")
