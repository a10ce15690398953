"""Run code in a fresh interpreter at the repository root: what a new process imports is only
visible there (the test process has imported everything already)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def printed_lines(code: str) -> list[str]:
    """The lines `code` prints; it must exit 0."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()
