"""Every place data_pipeline reaches into a library's internals, one module per patched
behaviour; `guard.py` says what each declares and how it is kept honest across upgrades."""

MODULES = (
    "data_pipeline.patches.streaming_shard_state",
    "data_pipeline.patches.streaming_local_fastpath",
    "data_pipeline.patches.streaming_mapped_shards",
    "data_pipeline.patches.streaming_barrier",
    "data_pipeline.patches.streaming_download_deadline",
    "data_pipeline.patches.torch_shm_batch_files",
    "data_pipeline.patches.streaming_stale_shm",
    "data_pipeline.patches.streaming_job_prefix",
    "data_pipeline.patches.streaming_shm_attach",
)
