"""Which files live processes use: what a clean-up of shared memory must never remove."""

from __future__ import annotations

import os


def live_paths() -> set[str]:
    """Paths mapped or held open by a live process, from /proc. A caller can read the maps of
    its own user's processes, and only its own files are its to remove."""
    paths = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                paths.update(
                    p[5].strip() for p in (line.split(None, 5) for line in f) if len(p) == 6
                )
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # exited meanwhile, or not ours to read
            continue
        for fd in fds:
            try:
                paths.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
    return paths


def remove_files(paths: list[str]) -> list[str]:
    """Remove `paths`, skipping any another clean-up removed first; returns those removed."""
    removed = []
    for path in paths:
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed
