"""What travels from the machine running `soho-scale launch` to the ranks on other nodes.

Non-secret settings every rank needs (`PROPAGATED`: storage endpoint, region, tracking URI, ...,
and every NCCL_*, TORCH_* and MLFLOW_* setting) travel by value: in the sbatch script, in the Kubernetes manifest, or in DeepSpeed's env file
for the hostfile runner. A secret (`soho_scale.secrets`) never goes into a file we write:
credentials come from each host's own environment or AWS chain (hostfile, Slurm) or from
Kubernetes Secrets by reference. A setting whose value is a URL with a user:password in it
(`MLFLOW_TRACKING_URI=https://user:pw@host`) travels without them: the nodes take MLflow's from
MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN in their own environment (Kubernetes:
the Secret), S3's from the AWS chain, and a Slurm job keeps the whole value it inherits from
sbatch (`credentialed`); one with a credential in its query does not travel. The
runner's env-file and export formats are those of
`soho_scale.engine.patches.deepspeed_runner_env`.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from soho_scale.engine.patches.deepspeed_runner_env import (
    ENV_FILE_VARIABLE,
    auto_exported,
    runner_env_files,
)
from soho_scale.secrets import has_credentials, is_secret_name, secret_values, split_credentials

# Settings every rank needs whose values are not secret; propagated by value.
PROPAGATED = (
    "S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "DS_ACCELERATOR",
)


# Families of settings that tune the ranks (NCCL's transport, torch's distributed debugging,
# MLflow's client: MLFLOW_TRACKING_URI, its request retries and timeouts): every one set here
# travels, unless its name or value is a secret.
PROPAGATED_PREFIXES = ("NCCL_", "TORCH_", "MLFLOW_")


def propagated_env(environ: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(non-secret settings to propagate by value, notes on what was held back and why)."""
    secrets = secret_values(environ)
    values, notes = {}, []
    # A name that is not a shell identifier could hold `$(...)`: it does not travel.
    families = sorted(
        name
        for name in environ
        if name.startswith(PROPAGATED_PREFIXES)
        and name not in PROPAGATED
        and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)
    )
    for name in (*PROPAGATED, *families):
        value = environ.get(name)
        if not value:
            continue
        if is_secret_name(name):
            notes.append(
                f"{name} not propagated: a secret (each node needs it in its own environment)"
            )
            continue
        travelling, note = without_credentials(name, value, secrets)
        if note:
            notes.append(note)
        if travelling is not None:
            values[name] = travelling
    return values, notes


def without_credentials(name: str, value: str, secrets: set[str]) -> tuple[str | None, str | None]:
    """(what of setting `name` may travel, None: nothing; a note on what was held back)."""
    if value in secrets:
        return None, f"{name} not propagated: its value is a secret"
    bare, user, password = split_credentials(value)
    if has_credentials(bare) or bare in secrets:
        return None, f"{name} not propagated: its value holds a credential"
    if user or password:
        where = (
            "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN"
            if name.startswith("MLFLOW")
            else "the nodes' own credentials (AWS chain)"
        )
        return bare, f"{name} propagated without its user:password (each node: {where})"
    return value, None


def credentialed(environ: dict[str, str], env: dict[str, str]) -> set[str]:
    """The settings of `env` that travel without the credentials their value holds here
    (`MLFLOW_TRACKING_URI=https://user:pw@host`)."""
    return {name for name in env if has_credentials(environ.get(name, ""))}


def cluster_env(environ: dict[str, str], cpu: bool) -> dict[str, str]:
    """What a generated sbatch script or manifest sets on the nodes: `propagated_env`, with
    DS_ACCELERATOR=cpu only for `--cpu` (a laptop's "cpu" must not reach a GPU cluster); what was
    held back is said on stderr."""
    env, notes = propagated_env(environ)
    env.pop("DS_ACCELERATOR", None)
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"  # ranks on CPU over gloo
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return env


def deepspeed_env(environ: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """What the env file holds: the user's own .deepspeed_env entries and our settings, minus
    anything that looks like a secret (those must already be in each host's environment)."""
    values, notes, secrets = {}, [], secret_values(environ)
    for path in runner_env_files(environ):
        for line in Path(path).read_text().splitlines():
            name, sep, value = line.partition("=")
            if not sep or not name.strip():
                continue
            if is_secret_name(name):
                notes.append(f"{name.strip()} from {path} not propagated: looks like a secret")
                continue
            travelling, note = without_credentials(name.strip(), value.strip(), secrets)
            if note:
                notes.append(f"{note} (from {path})")
            if travelling is not None:
                values[name.strip()] = travelling
    ours, held_back = propagated_env(environ)
    return {**values, **ours}, notes + held_back


def write_env_file(path: str, values: dict[str, str]) -> None:
    # The runner splits every line on "=": no comments, no blank lines.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in values.items())


def launcher_environment(environ: dict[str, str], env_file: str) -> tuple[dict[str, str], list]:
    """The runner's environment: ours, pointed at the env file, with what the runner would copy
    onto every remote command line (and into its log) removed where it is a secret
    (MLFLOW_TRACKING_TOKEN...) or holds one (a URL's user:password): those settings travel
    through the env file, `deepspeed_env`, as they may."""
    env = dict(environ)
    secrets = secret_values(environ)
    removed = [
        k
        for k in env
        if auto_exported(k)
        and env[k]
        and (is_secret_name(k) or without_credentials(k, env[k], secrets) != (env[k], None))
    ]
    for name in removed:
        del env[name]
    env[ENV_FILE_VARIABLE] = os.path.abspath(env_file)
    return env, removed
