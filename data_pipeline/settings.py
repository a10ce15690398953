"""Defaults of the data path, defined once: the job spec's `data.*` fields and the keyword
arguments of `build_dataset` / `build_loader` both read them."""

WORKERS = 2  # loader processes per rank
DOWNLOAD_RETRY = 2  # attempts in quick succession (streaming's own retry; it raises at 0)
DOWNLOAD_TIMEOUT_S = 60.0  # per socket read, not per file
# An unreachable storage endpoint is retried (capped backoff) this long before a shard download
# or a checkpoint transfer fails: the defaults ride out outages up to 10 minutes.
STORAGE_DEADLINE_S = 600.0
VALIDATE_HASH = "xxh64"  # checked right after each download
NUM_CANONICAL_NODES = 1  # fixed, so that a resume on another world size sees each sample once
# No batch for this long: an error naming the shards still downloading (a job's loader adds its
# storage deadline: a download waiting out an outage is not a stall).
STALL_TIMEOUT_S = 300.0
PREFETCH_FACTOR = 4  # batches each loader worker keeps ready (plan.py sizes /dev/shm from it)
SHUFFLE_SEED = 9176
