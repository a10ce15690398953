"""Rank process: `python -m soho_scale.train JOB [KEY=VALUE ...]` (started by the launcher)."""

import sys

from soho_scale.launch import rank_main

if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1:]))
