"""Speed (clean-up) patch of DeepSpeed: CPU ranks unlink DeepSpeed's shared-memory all-reduce
segment once every rank has mapped it.

DeepSpeed's CPU comm op (`deepspeed/ops/csrc/cpu/comm/shm.cpp`) creates a ~69 MB segment per
rank in /dev/shm, named `deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`,
when every rank is on one machine, and never unlinks it: every CPU run leaks it, killed or not,
until /dev/shm and RAM are full. Once every rank has passed `init_distributed` (and a barrier)
each has mapped every other's segment; the mappings stay valid until the processes exit, so the
names can go at once. Delete the patch when DeepSpeed unlinks its segments itself.
"""

from __future__ import annotations

import os

from data_pipeline.patches.guard import Patch

PATCH = Patch(
    module=__name__,
    library="deepspeed",
    tested=">=0.19.8,<0.20",
    kind="speed",
    relies_on={"deepspeed/ops/csrc/cpu/comm/shm.cpp": "a45dd509dc60a193"},
    what="CPU ranks unlink their DeepSpeed all-reduce segment in /dev/shm after set-up",
    buys="/dev/shm and RAM on CPU machines: ~69 MB per rank per run that otherwise stays until "
    "reboot; no effect on speed or on GPU jobs",
)


def supported() -> bool:
    return PATCH.supported()


def install() -> bool:
    return PATCH.install()


def segment_path(rank: int) -> str:
    """/dev/shm path of `rank`'s all-reduce segment (shm.cpp: SHM_BUFFER_NAME_uid_addr_port_rank)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_segment(rank: int) -> bool:
    """Unlink `rank`'s segment (call after a barrier that follows `init_distributed` on every
    rank). Returns whether a segment was removed."""
    try:
        os.unlink(segment_path(rank))
    except FileNotFoundError:
        return False
    return True
