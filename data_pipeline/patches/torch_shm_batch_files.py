"""Speed (clean-up) patch of torch: delete the shared-memory batch files that loader workers
killed together with torch's shared-memory manager leave behind.

With the `file_system` sharing strategy (`data_pipeline.loader.WorkerInit`) each batch travels
as a file in /dev/shm named `torch_<creating pid>_<random>_<counter>` (torch's libshm, C++; the
name is not promised anywhere). torch's manager unlinks the files of a worker that dies, but a
SIGKILL of the whole process group (a preempted job) kills the manager too, and the batches in
flight stay in /dev/shm until reboot. `remove_orphans` deletes the files of processes that no
longer run, unless a live process (another job's loader, say) still maps or holds one. Delete the
patch when torch unlinks them itself.
"""

from __future__ import annotations

import os

from data_pipeline.live_files import live_paths
from data_pipeline.patches.guard import Patch

PATCH = Patch(
    module=__name__,
    library="torch",
    tested=">=2.14,<2.15",
    kind="speed",
    relies_on={
        "torch.multiprocessing.reductions:reduce_storage": "5a2f12e45099f34f",
        "torch.multiprocessing:set_sharing_strategy": "3f12aa75571790de",
    },
    what="a loader with workers deletes /dev/shm batch files whose creating process is gone",
    buys="/dev/shm and RAM on any machine where jobs get killed: each killed loader leaves its "
    "batches in flight (seen: 32 small files a test-suite run); no effect on speed",
)


def install() -> bool:
    return PATCH.install()


def supported() -> bool:
    return PATCH.supported()


def remove_orphans(folder: str = "/dev/shm") -> list[str]:
    """Delete `torch_<pid>_...` files whose creating process no longer runs and that no live
    process maps or holds open; returns their names."""
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    live: set[str] | None = None
    for name in names:
        parts = name.split("_")
        if len(parts) < 3 or parts[0] != "torch" or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # still running (or not ours to signal): keep
        except ProcessLookupError:
            pass
        except OSError:
            continue
        live = live_paths() if live is None else live
        if os.path.join(folder, name) in live:
            continue  # received by a process that still runs
        try:
            os.remove(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass
    return removed
