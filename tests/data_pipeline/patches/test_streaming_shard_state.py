"""patches/streaming_shard_state.py: a shard that fails is an error on every worker, never a
short epoch or a hang."""

from __future__ import annotations

import pytest
from streaming import Stream, StreamingDataset

from data_pipeline.errors import DataError
from data_pipeline.loader import build_loader
from data_pipeline.patches.streaming_shard_state import PATCH
from data_pipeline.storage import s3_client
from data_pipeline.streaming import build_dataset
from tests.data_pipeline.helpers import NUM_SAMPLES, dataset_url, epoch_ids, processor


def test_version_in_tested_range():
    assert PATCH.version_problem() is None


def test_fingerprints_unchanged():
    assert PATCH.fingerprint_problems() == []


def test_behaviour_a_failed_shard_is_marked_and_named(s3, tmp_path):
    url = dataset_url("state_vanish")
    ds = build_dataset(
        [url], processor(), str(tmp_path), 4, shuffle=False, download_retry=1, clean_stale_shm=False
    )
    s3_client().delete_object(Bucket="shards", Key="state_vanish/shard.00006.mds")
    with pytest.raises(DataError, match=r"s3://shards/state_vanish/shard\.00006\.mds"):
        epoch_ids(build_loader(ds, 4, num_workers=0))
    assert ds.state_of(6) == "failed"
    assert 6 in ds.stuck_shards()  # what a stalled loader's error names
    assert ds.state_of(0) == "local"


def test_still_needed_streaming_ends_the_epoch_early_without_an_error(s3, tmp_path):
    url = dataset_url("state_vanish_upstream")
    plain = StreamingDataset(
        streams=[Stream(remote=url, local=str(tmp_path / "cache"))],
        shuffle=False,
        batch_size=4,
        download_retry=1,
    )
    s3_client().delete_object(Bucket="shards", Key="state_vanish_upstream/shard.00006.mds")
    try:
        seen = sum(1 for _ in plain)
    except Exception as e:  # noqa: BLE001 - any error means upstream now reports the failure
        pytest.fail(f"upstream changed: streaming raises {type(e).__name__}; revise {PATCH.module}")
    if seen == NUM_SAMPLES:
        pytest.fail(f"upstream changed: the epoch was complete; revise {PATCH.module}")
    assert seen < NUM_SAMPLES  # a short epoch, and nothing said so
