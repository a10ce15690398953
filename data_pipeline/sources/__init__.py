"""One converter per published dataset format; each writes MDS shards."""
