"""A rank's stop request: SIGTERM, SIGINT or SIGUSR1 (a scheduler's preemption or time-limit
warning, Ctrl-C) asks for a checkpoint at the next step, and all ranks agree on it.

The rank entry point (`soho_scale.launch.rank`) installs it before its first heavy import, so a
signal that comes while the rank is still starting (imports, staging and converting a
checkpoint, `deepspeed.initialize`) is kept, not fatal: the rank trains one step, commits a
checkpoint and exits with PREEMPTED_EXIT_CODE like any other stopped rank. Torch is imported
only when the ranks compare flags.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

logger = logging.getLogger("soho_scale.train")

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Set by the node launcher for a rank it starts after the stop signal came.
STOP_REQUESTED = "SOHO_STOP_REQUESTED"


class StopFlag:
    def __init__(self):
        self.requested = os.environ.get(STOP_REQUESTED) == "1"
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        logger.warning("received %s: checkpointing at the next step", signal.Signals(signum).name)
        self.requested = True

    def any_rank(self, device: Any) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it each step)."""
        import torch
        import torch.distributed as dist

        # On the engine's device: NCCL reduces CUDA tensors only.
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def ignore_stop_signals() -> None:
    """For a rank's helper processes (the universal-checkpoint conversion; loader workers get
    `SIGNALS` as their `worker_ignored_signals`): a scheduler signals every process of the job,
    and the rank, not its helpers, decides when to stop, after saving a checkpoint."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
