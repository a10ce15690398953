"""A storage outage ridden out with the shipped defaults, through `soho-scale train`.

The S3 endpoint the job uses is a TCP proxy in front of the loopback S3 server; stopping it
closes its listening socket and every open connection (connection refused, not a stall), and it
comes back on the same port with the same data. The job spec carries none of the retry, deadline
or stall settings: the spec's defaults have to ride the outage out.
"""

from __future__ import annotations

import random
import re
import socket
import time

import pytest
import torch
import yaml

from tests.engine.conftest import (
    COLOURS,
    _jpeg,
    kill_group,
    metrics_lines,
    record,
    start_train,
    wait_for,
    wait_for_steps,
)
from tests.storage_proxy import StoppableProxy

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

OUTAGE_S = 125  # longer than the 2 minutes the defaults promise to ride out
SAMPLES = 320  # 20 steps an epoch at global batch 16: streaming cannot have fetched them all
STEPS = 8
SECOND_S = 20  # the short second outage: long enough for the waiting process to say so
SHARD_WAIT = re.compile(r"unreachable \(s3://soho-test/outage-shards/shard\.\d+\.mds")
UPLOAD_WAIT = re.compile(r"unreachable \(s3://soho-test/ckpt-outage/step_00000004/")
SHARDS_URL = "s3://soho-test/outage-shards"


def _write_small_shards() -> None:
    """Many small shards (a few samples each), so that downloads go on through the epoch."""
    from streaming import MDSWriter

    rng = random.Random(1)
    columns = {"image": "bytes", "captions": "json", "source": "str", "split": "str"}
    columns["image_id"] = "str"
    with MDSWriter(out=SHARDS_URL, columns=columns, hashes=["xxh64"], size_limit=1 << 12) as w:
        for i in range(SAMPLES):
            colour, shape = rng.choice(sorted(COLOURS)), rng.choice(["square", "circle"])
            w.write(
                {
                    "image": _jpeg(colour, shape, rng.choice([(64, 48), (48, 64), (64, 64)])),
                    "captions": [f"a {colour} {shape}", f"one {shape} that is {colour}"],
                    "source": "test",
                    "split": "train",
                    "image_id": str(i),
                }
            )


def _job(make_job, name: str) -> str:
    path = make_job(
        name,
        data__streams=[{"remote": SHARDS_URL}],
        schedule__steps=STEPS,
        checkpoint__dir=f"s3://soho-test/ckpt-{name}",
        checkpoint__interval_steps=4,
    )
    with open(path) as f:
        spec = yaml.safe_load(f)
    # The shipped defaults: the demo job's own retry, timeout and stall settings go.
    for key in ("download_retry", "download_timeout", "download_deadline_s", "stall_timeout_s"):
        spec["data"].pop(key, None)
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    return path


def _manifests(prefix: str) -> list[str]:
    from data_pipeline.storage import s3_client

    listing = s3_client().list_objects_v2(Bucket="soho-test", Prefix=f"{prefix}/")
    return sorted(
        o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith("manifest.json")
    )


def _down(proxy: StoppableProxy, seconds: float) -> None:
    """The endpoint refuses connections for `seconds`."""
    proxy.stop()
    with pytest.raises(ConnectionRefusedError):  # really down, not stalled
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
    time.sleep(seconds)
    proxy.start()


def _read(run: str) -> str:
    with open(run + ".log") as f:
        return f.read()


def test_outage_mid_epoch_and_during_a_checkpoint_upload_is_ridden_out(make_job, tmp_path, s3):
    _write_small_shards()
    proxy = StoppableProxy(s3.port)
    job, reference_job = _job(make_job, "outage"), _job(make_job, "reference")
    run, reference_run = str(tmp_path / "run"), str(tmp_path / "reference")
    procs = []
    try:
        procs.append(start_train(job, run, 2, env={"S3_ENDPOINT_URL": proxy.url}))
        procs.append(start_train(reference_job, reference_run, 2))  # straight to the server
        wait_for_steps(run, 1, timeout=300)
        _down(proxy, OUTAGE_S)
        steps_in_outage = len(metrics_lines(run))
        # The outage meets what the run waits on first: the shard downloads of steps 2-4 when
        # they were not fetched before it, else the step-4 checkpoint upload. A short second one
        # meets the other: the upload, down as step 4 ends (its save writes and hashes locally
        # first); or a download, down as step 4 is committed (the loader, its window full since
        # the first outage, fetches again only once steps 5-8 consume).
        if not UPLOAD_WAIT.search(_read(run)):
            wait_for_steps(run, 4, timeout=300)
            _down(proxy, SECOND_S)
        elif not SHARD_WAIT.search(_read(run)):
            committed = "checkpoint s3://soho-test/ckpt-outage/step_00000004 committed"
            wait_for(lambda: committed in _read(run), 300, "the step-4 checkpoint")
            _down(proxy, SECOND_S)
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p)
        proxy.stop()
    log = open(run + ".log").read()
    assert codes == [0, 0], log[-4000:] + open(reference_run + ".log").read()[-3000:]
    assert steps_in_outage < STEPS  # the run had to wait for the endpoint
    # The outages hit a shard download and the step-4 checkpoint upload; each process waiting
    # says once that it waits and once that the endpoint is back.
    assert SHARD_WAIT.search(log), log[-4000:]
    assert UPLOAD_WAIT.search(log), log[-4000:]
    backs = re.findall(r"is back after (\d+) s", log)
    assert backs and max(int(s) for s in backs) >= OUTAGE_S * 0.8, backs
    assert log.count("unreachable (") == len(backs) <= 8  # no line per attempt
    assert _manifests("ckpt-outage") == [
        "ckpt-outage/step_00000004/manifest.json",
        "ckpt-outage/step_00000008/manifest.json",
    ]
    # Nothing lost or repeated: every step sees the samples and gives the losses it gives
    # without an outage.
    for rank in (0, 1):
        full, waited = record(reference_run, rank, 0), record(run, rank, 0)
        assert waited["samples"] == full["samples"]
        torch.testing.assert_close(waited["losses"], full["losses"], rtol=1e-6, atol=1e-6)
    assert len(metrics_lines(run)) == STEPS
