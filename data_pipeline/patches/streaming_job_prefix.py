"""Correctness patch of mosaicml-streaming: each job (each node of a job) looks for its
shared-memory prefix from a start of its own, so that jobs starting together on one machine do
not pick the same one.

A streaming dataset names its node-wide shared memory `<prefix int, 6 digits>_<name>` and picks
the prefix as the first free one from 0 (`streaming.base.shared.prefix._each_prefix_int`): every
rank of the node looks, they wait for each other, then the node's first rank creates the files.
Two jobs that look before either has created its files pick the same prefix, and the slower one
fails with `FileExistsError: '/00000N_locals'` (seen on a 2-core machine running several
trainings at once), or attaches to the other's files. `install()` makes the search start at a
multiple of 100 drawn from the job's rendezvous (MASTER_ADDR, MASTER_PORT) and node, the same
for every rank of a node and different between live jobs but for 1 chance in 9,900 (where it
falls back to streaming's behaviour). Delete it when streaming registers its prefix atomically.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator

from data_pipeline.patches.guard import Patch

PATCH = Patch(
    module=__name__,
    library="mosaicml-streaming",
    tested=">=0.13.0,<0.14",
    kind="correctness",
    relies_on={
        "streaming.base.shared.prefix:_each_prefix_int": "25ab347cf03da039",
        "streaming.base.shared.prefix:_check_and_find": "ebfeafad7d3db378",
        "streaming.base.shared.prefix:get_shm_prefix": "37e2495f354e397e",
    },
    what="each job's (and node's) search for a free shared-memory prefix starts at its own "
    "offset: jobs starting together do not pick the same prefix",
)
SLOTS = 9900  # starts 0, 100, ..., 989900: prefixes stay 6 digits


def job_start() -> int:
    """Where this job's node starts looking: from its rendezvous and node (a lone process
    without one: its pid)."""
    if "MASTER_PORT" in os.environ:
        from streaming.base.world import World

        node = World.detect().node
        key = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ['MASTER_PORT']}:{node}"
    else:
        key = f"pid{os.getpid()}"
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % SLOTS * 100


def job_prefix_ints() -> Iterator[int]:
    """The prefixes to try, in order: this job's start, then up."""
    return itertools.count(job_start())


def supported() -> bool:
    return PATCH.supported()


def install() -> bool:
    if not PATCH.install():
        return False
    from streaming.base.shared import prefix

    prefix._each_prefix_int = job_prefix_ints
    return True
