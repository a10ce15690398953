"""The user error of `soho-scale launch`, raised by every scheduler module and by the command."""

from __future__ import annotations


class ClusterError(ValueError):
    """A launch request that cannot work (bad hostfile, job outside the repo, missing tool)."""
