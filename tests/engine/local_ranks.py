"""Two ranks of one machine as plain processes, for probes of a rank's process set-up."""

from __future__ import annotations

import os
import subprocess
import sys


def two_local_ranks(probe: str, port: str, **env: str) -> list[str]:
    """Run `probe` as ranks 0 and 1 of a 2-process world on this machine: each one's last line."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_SIZE")}
    base.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", probe],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        results = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:  # a rank left behind would wait for its peer forever
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    return [out.strip().splitlines()[-1] for out, _ in results]
