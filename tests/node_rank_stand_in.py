"""A stand-in rank for the node launcher's tests (`python -m tests.node_rank_stand_in MODE OUT`):
`env` writes its environment, `save` stops on SIGTERM after a slow 'checkpoint' (exit 75),
`fail` makes rank 1 crash while the others block as in a collective, `slow` starts slowly
(a stop signal may come before its handler is installed)."""

import json
import os
import signal
import sys
import time

mode, out = sys.argv[1], sys.argv[2]
rank = os.environ["RANK"]
if mode == "env":
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(dict(os.environ), f)
    sys.exit(0)
if mode == "save":

    def save(signum, frame):
        time.sleep(3)  # longer than nothing: the launcher must wait for it
        open(os.path.join(out, f"saved{rank}"), "w").close()
        sys.exit(75)

    signal.signal(signal.SIGTERM, save)
    open(os.path.join(out, f"ready{rank}"), "w").close()
    time.sleep(120)
    sys.exit(0)
if mode == "fail":
    open(os.path.join(out, f"ready{rank}"), "w").close()
    if rank == "1":
        time.sleep(1)
        sys.exit(3)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stuck: only SIGKILL ends it
    time.sleep(120)
