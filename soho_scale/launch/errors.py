"""The user error of `soho-scale launch`, and the checks of what users put into the files it
writes.

Everything user-supplied that lands in a generated sbatch script or manifest is either quoted
(shlex for shell, YAML's own quoting for manifests) or, where it lands somewhere quoting cannot
protect (an `#SBATCH` line, a comment, a Kubernetes name), checked against the characters that
field can hold and rejected with one line naming the flag.
"""

from __future__ import annotations

import re


class ClusterError(ValueError):
    """A launch request that cannot work (bad hostfile, job outside the repo, missing tool)."""


# A control character (newline above all) ends a comment or an `#SBATCH` line and starts a new
# line of shell or YAML.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

PATTERNS = {
    # Slurm partition/account names; several partitions are comma-separated.
    "name": (r"[A-Za-z0-9_.,-]+", "letters, digits, '_', '.', ',' and '-'"),
    # Slurm time limits: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or unlimited.
    "time": (r"(\d+-)?\d+(:\d+){0,2}|(?i:unlimited|infinite)", "e.g. 24:00:00 or 2-00:00:00"),
    # Container image references: [registry[:port]/]path[:tag][@digest].
    "image": (r"[A-Za-z0-9][A-Za-z0-9._/:@+-]*", "a container image reference"),
    # Kubernetes object names (Secrets, claims): DNS-1123 subdomains.
    "k8s": (r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", "lowercase letters, digits, '-' and '.'"),
    # Kubernetes quantities (sizeLimit).
    "quantity": (r"\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?", "e.g. 64Gi"),
}


def checked(flag: str, value: str | None, kind: str) -> str | None:
    """`value` when it is a well-formed `kind` (see PATTERNS); ClusterError naming `flag`."""
    if value is None:
        return None
    pattern, expected = PATTERNS[kind]
    if not re.fullmatch(pattern, value):
        raise ClusterError(f"{flag} {value!r}: expected {expected}")
    return value


def no_control_characters(flag: str, value: str) -> str:
    """`value` (quoted where it is used) when it holds no newline or other control character."""
    if _CONTROL.search(value):
        raise ClusterError(f"{flag} {value!r}: control characters (a newline...) are not allowed")
    return value
