"""Speed patch of DeepSpeed: `soho-scale train` starts DeepSpeed's per-node launcher itself.

For one local node, the `deepspeed` runner (`deepspeed --num_gpus N --module M ...`) imports
DeepSpeed (torch included) only to work out the command
`python -u -m deepspeed.launcher.launch --world_info=<base64 JSON> --master_addr=127.0.0.1
--master_port=P --module M ...`, which it then starts, and that launcher imports DeepSpeed again.
`local_launcher_command` builds the same command without the runner: `world_info` (local ranks
0..N-1 on "localhost", as the runner's `apply_num_nodes_and_gpus` makes them) is encoded as the
runner's `encode_world_info` encodes it (importing that function would import DeepSpeed here),
and the arguments are the ones `deepspeed.launcher.launch.parse_args` takes and its `main`
decodes. When the patch is off (outside the tested range, a relied-on piece changed, or
SOHO_DISABLE_PATCHES), `soho-scale train` starts the runner
(`soho_scale.launch.hostfile.runner_command`). Delete the patch when the runner starts without
importing DeepSpeed (tests/engine/patches/test_deepspeed_launcher.py says when).
"""

from __future__ import annotations

import base64
import json
import sys

from data_pipeline.patches.guard import Patch

PATCH = Patch(
    module=__name__,
    library="deepspeed",
    tested=">=0.19.8,<0.20",
    kind="speed",
    relies_on={
        "deepspeed.launcher.runner:encode_world_info": "f759fc2ce9cfb25b",
        "deepspeed.launcher.runner:apply_num_nodes_and_gpus": "f01e435b9c7c477a",
        "deepspeed.launcher.runner:main": "59f7a98bec11c072",
        "deepspeed.launcher.launch:parse_args": "0637f6b93cbcdf34",
        "deepspeed.launcher.launch:main": "47c43e9f60964039",
    },
    what="`soho-scale train` starts deepspeed.launcher.launch for its local ranks directly, "
    "not through the `deepspeed` runner",
    buys="the runner's start-up (one DeepSpeed import, seconds) before every `soho-scale train` "
    "(benchmarks/README.md, launcher start-up)",
)

LOCAL_HOST = "localhost"  # the runner's name for this machine when there is no hostfile
LOCAL_MASTER_ADDR = "127.0.0.1"  # the runner's master address for one local node


def supported() -> bool:
    return PATCH.supported()


def install() -> bool:
    return PATCH.install()


def encode_world_info(world_info: dict[str, list[int]]) -> str:
    """`deepspeed.launcher.runner.encode_world_info`: URL-safe base64 of the JSON."""
    return base64.urlsafe_b64encode(json.dumps(world_info).encode("utf-8")).decode("utf-8")


def local_launcher_command(nproc: int, master_port: int, rank_args: list[str]) -> list[str]:
    """DeepSpeed's per-node launcher for `nproc` ranks on this machine, each running `rank_args`
    (`--module MODULE ARGS...`): the command the runner runs for one local node."""
    world_info = encode_world_info({LOCAL_HOST: list(range(nproc))})
    command = [
        sys.executable,
        "-u",
        "-m",
        "deepspeed.launcher.launch",
        f"--world_info={world_info}",
    ]
    command += [f"--master_addr={LOCAL_MASTER_ADDR}", f"--master_port={master_port}"]
    return command + list(rank_args)
