"""Clean-up patch of mosaicml-streaming: stale shared memory of dead jobs is removed, and the
shared memory of live jobs on the same machine is never touched.

A streaming dataset keeps its node-wide state (shard states, barrier, epoch plan, ...) in
/dev/shm files named `<prefix int, 6 digits>_<name>`; a killed job leaves them behind, and a
relaunch whose cache folder one of them lists fails with streaming's "Reused local directory".
Streaming's own remedy, `streaming.base.util.clean_stale_shared_memory`, unlinks every prefix from
0 up, those of live jobs included: a second job on the machine then re-registers the first job's
prefix, and the first job's next loader workers attach to the second job's files. `remove_stale`
removes a prefix's files only when no live process maps or holds open any file of that prefix,
and only the caller's own. Without the patch nothing is removed (`soho-scale plan --clean-shm`
does it by hand). Delete it when streaming's clean-up spares the prefixes of live processes.
"""

from __future__ import annotations

import os
import re

from data_pipeline.live_files import live_paths, remove_files
from data_pipeline.patches.guard import Patch

PATCH = Patch(
    module=__name__,
    library="mosaicml-streaming",
    tested=">=0.13.0,<0.14",
    kind="speed",
    relies_on={
        "streaming.base.shared.prefix:_get_path": "4fa5596e4fa2a37b",
        "streaming.base.constant:SHM_TO_CLEAN": "be259beb30dc206f",
        "streaming.base.shared.prefix:_check_and_find": "ebfeafad7d3db378",
        "streaming.base.util:clean_stale_shared_memory": "4bf4bedeb05b4b0c",
    },
    what="stale streaming shared memory is removed per prefix, only when no live process uses "
    "any file of the prefix",
    buys="a relaunch after a kill in the same cache folder starts instead of failing with "
    "'Reused local directory', without removing the files of other live jobs on the machine",
)

# streaming.base.constant.SHM_TO_CLEAN, with the prefix `_get_path` puts before each name
STREAMING_SHM = re.compile(
    r"^(\d{6})_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|resume"
    r"|epoch_shape|epoch_data)$"
)


def install() -> bool:
    return PATCH.install()


def supported() -> bool:
    return PATCH.supported()


def remove_stale(shm_dir: str = "/dev/shm") -> list[str]:
    """Remove this user's streaming shared-memory files of every prefix that no live process
    uses; returns the removed paths."""
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return []
    by_prefix: dict[str, list[str]] = {}
    for name in names:
        match = STREAMING_SHM.match(name)
        path = os.path.join(shm_dir, name)
        try:
            mine = os.stat(path).st_uid == os.getuid()
        except OSError:
            continue
        if match and mine:
            by_prefix.setdefault(match.group(1), []).append(path)
    if not by_prefix:
        return []
    live = live_paths()
    removed = []
    for paths in by_prefix.values():
        if not any(path in live for path in paths):  # a live job's: all of its files stay
            removed += remove_files(sorted(paths))
    return removed
