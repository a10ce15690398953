"""Defaults of the data path, defined once: the job spec's `data.*` fields and the keyword
arguments of `build_dataset` / `build_loader` both read them."""

WORKERS = 2  # loader processes per rank
DOWNLOAD_RETRY = 2  # total attempts per shard download (streaming raises at 0)
DOWNLOAD_TIMEOUT_S = 60.0  # per socket read, not per file
VALIDATE_HASH = "xxh64"  # checked right after each download
NUM_CANONICAL_NODES = 1  # fixed, so that a resume on another world size sees each sample once
STALL_TIMEOUT_S = 300.0  # no batch for this long: an error naming the shards still downloading
PREFETCH_FACTOR = 4  # batches each loader worker keeps ready (plan.py sizes /dev/shm from it)
SHUFFLE_SEED = 9176
