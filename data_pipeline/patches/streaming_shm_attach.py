"""Correctness patch of mosaicml-streaming: a process attaching to a node-wide shared-memory block
that another process is still creating waits until the block has its size.

A streaming dataset's node-wide state (the worker barrier, shard states, ...) lives in blocks
that every rank of a node opens with streaming's `SharedMemory(name, create=None, size)`: it
tries to create the block and, when the block exists, sleeps one tick (7 ms) and attaches.
Python's `SharedMemory(create=True)` creates the file (`shm_open`) and sizes it (`ftruncate`) in
two steps, so a rank that attaches between them finds an empty file and fails with
`ValueError: cannot mmap an empty file`, which ends the whole job at its start (seen: rank 1 of a
2-rank job on a busy 2-core machine; upstream mosaicml/streaming issues #824 and #901, where a
later release waits longer for the creating rank, PR #966). `install()` makes an attach that meets
an empty block try again until it has its size, for up to `ATTACH_DEADLINE_S`, and then fail
with one line naming the block. Delete it when the installed streaming waits for the size itself.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from data_pipeline.patches.guard import Patch

PATCH = Patch(
    module=__name__,
    library="mosaicml-streaming",
    tested=">=0.13.0,<0.14",
    kind="correctness",
    relies_on={
        "streaming.base.shared.memory:SharedMemory.__init__": "2a519698f39062b9",
    },
    what="attaching to a streaming shared-memory block another rank is still creating waits for "
    "its size instead of failing the job with 'cannot mmap an empty file'",
)
ATTACH_DEADLINE_S = 30.0  # the creating rank sizes the block right after creating it
_POLL_S = 0.005
EMPTY = "cannot mmap an empty file"  # CPython's mmap on a file of size 0


def supported() -> bool:
    return PATCH.supported()


def waiting_for_size(init: Any) -> Any:
    """`SharedMemory.__init__` that, when it meets a block not yet sized, tries again."""

    @functools.wraps(init)
    def __init__(  # noqa: ANN202
        self,  # noqa: ANN001
        name: str | None = None,
        create: bool | None = None,
        size: int = 0,
        auto_cleanup: bool = True,
    ):
        deadline = time.monotonic() + ATTACH_DEADLINE_S
        while True:
            try:
                return init(self, name, create, size, auto_cleanup)
            except ValueError as e:
                if create is True or EMPTY not in str(e):
                    raise
                if time.monotonic() >= deadline:
                    raise ValueError(
                        f"shared memory {name} stayed empty for {ATTACH_DEADLINE_S:g} s: the "
                        "process that created it never sized it"
                    ) from e
            time.sleep(_POLL_S)

    __init__.soho_waits_for_size = True  # type: ignore[attr-defined]
    return __init__


def install() -> bool:
    if not PATCH.install():
        return False
    from streaming.base.shared.memory import SharedMemory

    if not getattr(SharedMemory.__init__, "soho_waits_for_size", False):
        SharedMemory.__init__ = waiting_for_size(SharedMemory.__init__)
    return True
