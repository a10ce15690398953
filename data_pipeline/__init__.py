"""data_pipeline: dataset converters, MDS shards on S3-compatible storage, streaming loaders."""
