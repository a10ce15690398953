"""Correctness patch of DeepSpeed: the runner's environment formats that `soho-scale launch
--hostfile` writes for and guards against.

To start ranks on other hosts, DeepSpeed's runner (`deepspeed --hostfile ...`, `runner.main`)
puts on every remote command line (pdsh's `export K=V;`, mpirun's `-x K=V`, srun's `--export`):
- every variable of its own environment whose name starts with one of `EXPORT_ENVS` or the
  accelerator's `export_envs()` (NCCL on CUDA): `AUTO_EXPORT_PREFIXES`, secrets included;
- every `KEY=VALUE` line (split on the first "=", no comments or blank lines) of the env file
  named by `DS_ENV_FILE` (default `.deepspeed_env`), looked up in ~ and in the current folder;
  an absolute name is that file.
None of this is a promised interface. `soho_scale.launch.environment` relies on it to carry the
non-secret settings in an env file and to keep secret-named variables, and settings whose value
holds a credential (a URL's user:password), off the runner's environment. If the runner changed these formats, secrets could reach remote command lines
(visible in `ps` on every host) or settings could stop travelling, so outside the tested range,
or when a relied-on piece changed, `install()` refuses with one line (PatchError) before
anything is written or started.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from data_pipeline.patches.guard import Patch

PATCH = Patch(
    module=__name__,
    library="deepspeed",
    tested=">=0.19.8,<0.20",
    kind="correctness",
    relies_on={
        "deepspeed.launcher.runner:EXPORT_ENVS": "5f2b6c0ed59311c8",
        "deepspeed.launcher.runner:DEEPSPEED_ENVIRONMENT_NAME": "e521afa51ff1d621",
        "deepspeed.launcher.runner:DEEPSPEED_ENVIRONMENT_PATHS": "01f90a3601c9564f",
        "deepspeed.launcher.runner:main": "59f7a98bec11c072",
        "deepspeed.launcher.multinode_runner:MultiNodeRunner.add_export": "d8e379f80dbbe8ce",
        "deepspeed.accelerator.cuda_accelerator:CUDA_Accelerator.export_envs": "4b8ae465e0e0ff4e",
    },
    what="`soho-scale launch --hostfile` writes the runner's env file (DS_ENV_FILE) and keeps "
    "secret-named variables the runner would copy onto remote command lines off its environment",
)

ENV_FILE_VARIABLE = "DS_ENV_FILE"  # runner.py: DEEPSPEED_ENVIRONMENT_NAME's variable
ENV_FILE_NAME = ".deepspeed_env"  # ... and its default
# runner.py: EXPORT_ENVS, and the CUDA accelerator's export_envs()
AUTO_EXPORT_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")


def supported() -> bool:
    return PATCH.supported()


def install() -> bool:
    return PATCH.install()


def runner_env_files(environ: Mapping[str, str]) -> list[str]:
    """The env files the runner would read with `environ` (runner.py: DEEPSPEED_ENVIRONMENT_PATHS,
    ~ then the current folder), those that exist, each once."""
    name = environ.get(ENV_FILE_VARIABLE, ENV_FILE_NAME)
    paths = [os.path.join(os.path.expanduser("~"), name), os.path.join(".", name)]
    return [p for p in dict.fromkeys(os.path.abspath(p) for p in paths) if os.path.isfile(p)]


def auto_exported(name: str) -> bool:
    """The runner copies variable `name` of its environment onto every remote command line."""
    return name.startswith(AUTO_EXPORT_PREFIXES)
