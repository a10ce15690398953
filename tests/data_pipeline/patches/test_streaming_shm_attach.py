"""patches/streaming_shm_attach.py: a rank that attaches to a streaming shared-memory block while
another rank is between creating and sizing it waits for the size; stock streaming fails."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from data_pipeline.patches import streaming_shm_attach
from data_pipeline.patches.streaming_shm_attach import PATCH, install

SIZE = 12


def test_version_in_tested_range():
    assert PATCH.version_problem() is None


def test_fingerprints_unchanged():
    assert PATCH.fingerprint_problems() == []


def _created_not_sized() -> tuple[str, int]:
    """A block as Python's SharedMemory(create=True) leaves it between `shm_open` and
    `ftruncate`: the file exists, empty. Returns (name, fd)."""
    name = f"soho_test_{uuid.uuid4().hex[:12]}"
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    return name, fd


def _remove(name: str, fd: int) -> None:
    os.close(fd)
    if os.path.exists(f"/dev/shm/{name}"):
        os.unlink(f"/dev/shm/{name}")


def test_behaviour_an_attach_waits_until_the_creator_sizes_the_block():
    from streaming.base.shared.memory import SharedMemory

    assert install()
    name, fd = _created_not_sized()

    def creator_finishes() -> None:
        time.sleep(0.3)
        os.ftruncate(fd, SIZE)
        os.pwrite(fd, b"written", 0)

    finishing = threading.Thread(target=creator_finishes)
    try:
        finishing.start()
        started = time.monotonic()
        shm = SharedMemory(name, None, SIZE, auto_cleanup=False)  # as streaming's blocks open
        waited = time.monotonic() - started
        assert bytes(shm.buf[:7]) == b"written" and len(shm.buf) == SIZE
        assert waited >= 0.25  # it did meet the empty block and wait
        shm.shm.close()
    finally:
        finishing.join()
        _remove(name, fd)


def test_behaviour_a_block_that_never_gets_its_size_is_named(monkeypatch):
    from streaming.base.shared.memory import SharedMemory

    assert install()
    monkeypatch.setattr(streaming_shm_attach, "ATTACH_DEADLINE_S", 0.2)
    name, fd = _created_not_sized()
    try:
        with pytest.raises(ValueError, match=f"shared memory {name} stayed empty for 0.2 s"):
            SharedMemory(name, None, SIZE, auto_cleanup=False)
    finally:
        _remove(name, fd)


# Stock streaming, in a process of its own (this one has the patch installed): the attach finds
# the empty file and fails.
STOCK = """
import os, sys
from streaming.base.shared.memory import SharedMemory
name = sys.argv[1]
fd = os.open("/dev/shm/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
try:
    SharedMemory(name, None, 12, auto_cleanup=False)
    print("attached")
except ValueError as e:
    print(e)
finally:
    os.close(fd)
    os.unlink("/dev/shm/" + name)
"""


def test_still_needed_stock_streaming_fails_on_a_block_not_yet_sized():
    name = f"soho_test_{uuid.uuid4().hex[:12]}"
    out = subprocess.run(
        [sys.executable, "-c", STOCK, name], capture_output=True, text=True, timeout=120, check=True
    ).stdout.strip()
    assert out == "cannot mmap an empty file", f"upstream changed ({out}); delete {PATCH.module}"
