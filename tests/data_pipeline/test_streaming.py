"""Streaming datasets (the correctness layer) against a real moto_server S3 API and real gloo
ranks: every sample exactly once, damaged or missing shards named, outages ridden out."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from streaming import StreamingDataset

from data_pipeline.errors import DataError
from data_pipeline.loader import build_loader
from data_pipeline.loopback import free_port
from data_pipeline.storage import s3_client
from data_pipeline.streaming import StreamSource, build_dataset
from tests.data_pipeline.helpers import (
    NUM_SAMPLES,
    dataset_url,
    epoch_ids,
    jpeg,
    processor,
    write_shards,
)
from tests.storage_proxy import StoppableProxy


def test_round_trip_matches_plain_streaming(s3, tmp_path):
    url = dataset_url("plain")
    plain = StreamingDataset(remote=url, local=str(tmp_path / "plain"), shuffle=False)
    raw = {plain[i]["image_id"]: plain[i]["image"] for i in range(plain.num_samples)}
    assert raw == {str(i): jpeg(i) for i in range(NUM_SAMPLES)}

    ds = build_dataset([url], None, str(tmp_path / "ours"), 4, shuffle=False, clean_stale_shm=False)
    ours = [ds[i] for i in range(ds.num_samples)]
    assert [s["image"] for s in ours] == [raw[s["image_id"]] for s in ours]
    assert [s["sample_id"] for s in ours] == list(range(NUM_SAMPLES))


def test_compressed_local_shards_are_read_in_workers(tmp_path):
    # A local folder of zstd shards holds no raw shard files: streaming counts such a shard as
    # present and decompresses it on first use; the loader's shortcuts must not skip that.
    folder = str(tmp_path / "zstd")
    write_shards(folder, compression="zstd")
    assert not [f for f in os.listdir(folder) if f.endswith(".mds")]
    ds = build_dataset([folder], processor(), str(tmp_path / "cache"), 4, clean_stale_shm=False)
    loader = build_loader(ds, 4, num_workers=2, persistent_workers=True)
    for _ in range(2):  # the second epoch finds every shard decompressed
        assert sorted(epoch_ids(loader)) == list(range(NUM_SAMPLES))


def test_missing_shard_is_named_before_the_epoch(s3, tmp_path):
    url = dataset_url("missing")
    s3_client().delete_object(Bucket="shards", Key="missing/shard.00004.mds")
    with pytest.raises(DataError, match="shard.00004.mds"):
        build_dataset([url], processor(), str(tmp_path), 4, clean_stale_shm=False)


def test_shard_deleted_mid_run_is_an_error_not_a_hang(s3, tmp_path):
    url = dataset_url("vanish")
    ds = build_dataset([url], processor(), str(tmp_path), 4, shuffle=False, clean_stale_shm=False)
    s3_client().delete_object(Bucket="shards", Key="vanish/shard.00006.mds")
    loader = build_loader(ds, 4, num_workers=2, stall_timeout_s=30)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"s3://shards/vanish/shard\.00006\.mds"):
        epoch_ids(loader)
    assert time.monotonic() - start < 30


def test_shard_deleted_mid_run_in_process_does_not_end_epoch_silently(s3, tmp_path):
    url = dataset_url("vanish0")
    ds = build_dataset(
        [url], processor(), str(tmp_path), 4, shuffle=False, download_retry=1, clean_stale_shm=False
    )
    s3_client().delete_object(Bucket="shards", Key="vanish0/shard.00006.mds")
    with pytest.raises(DataError, match=r"shard\.00006\.mds"):
        epoch_ids(build_loader(ds, 4, num_workers=0))


def test_altered_shard_fails_hash_check_naming_it(s3, tmp_path):
    url = dataset_url("altered")
    client = s3_client()
    data = bytearray(
        client.get_object(Bucket="shards", Key="altered/shard.00002.mds")["Body"].read()
    )
    data[-5] ^= 0xFF  # same size: only the hash can tell
    client.put_object(Bucket="shards", Key="altered/shard.00002.mds", Body=bytes(data))
    ds = build_dataset([url], processor(), str(tmp_path), 4, clean_stale_shm=False)
    with pytest.raises(DataError, match=r"shard\.00002\.mds"):
        epoch_ids(build_loader(ds, 4, num_workers=0))


def test_corrupt_cached_shard_is_downloaded_again(s3, tmp_path):
    url = dataset_url("plain")
    cache = str(tmp_path / "cache")
    ds = build_dataset([url], None, cache, 4, shuffle=False, clean_stale_shm=False)
    expected = ds[7]["image"]
    del ds
    cached = next(
        os.path.join(r, f) for r, _, fs in os.walk(cache) for f in fs if f == "shard.00002.mds"
    )
    with open(cached, "r+b") as f:
        f.seek(-5, os.SEEK_END)
        f.write(b"XXXXX")
    ds = build_dataset([url], None, cache, 4, shuffle=False, clean_stale_shm=False)
    assert ds[7]["image"] == expected


def test_mixed_streams_follow_proportions(s3, tmp_path):
    a, b = dataset_url("plain"), dataset_url("mix_b", n=20)
    ds = build_dataset(
        [StreamSource(a, 0.75), StreamSource(b, 0.25)],
        processor(),
        str(tmp_path),
        4,
        clean_stale_shm=False,
    )
    ids = epoch_ids(build_loader(ds, 4, num_workers=0))
    from_a = sum(i < NUM_SAMPLES for i in ids)
    assert len(ids) == ds.epoch_size and from_a == round(0.75 * ds.epoch_size)
    # data.epoch_size: an epoch of that many samples, each stream repeated or cut to its share
    ds = build_dataset(
        [StreamSource(a, 0.75), StreamSource(b, 0.25)],
        processor(),
        str(tmp_path / "sized"),
        4,
        clean_stale_shm=False,
        epoch_size=24,
    )
    ids = epoch_ids(build_loader(ds, 4, num_workers=0))
    assert len(ids) == ds.epoch_size == 24 and sum(i < NUM_SAMPLES for i in ids) == 18


# ---- multi-rank: real gloo processes, the environment streaming reads -----------------------


def _rank_main(rank, world, port, endpoint, url, cache, out, phase):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        S3_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    global_batch = 8
    ds = build_dataset(
        [url],
        processor(),
        cache,
        global_batch // world,
        shuffle=True,
        num_canonical_nodes=1,
        clean_stale_shm=False,
    )
    loader = build_loader(ds, global_batch // world, num_workers=1)
    if phase.get("resume_from"):
        with open(phase["resume_from"]) as f:
            loader.load_state_dict(json.load(f))
    seen = {}
    for step, batch in enumerate(loader):
        for row, sample_id in enumerate(batch["sample_ids"].tolist()):
            rows = batch["text_image_index"] == row
            seen[sample_id] = batch["text_ids"][rows].tolist()
        if phase.get("stop_after") and step + 1 == phase["stop_after"]:
            state = loader.state_dict()
            if rank == 0:
                with open(phase["save_to"], "w") as f:
                    json.dump(state, f)
            break
    with open(os.path.join(out, f"{phase['name']}-{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(world, url, cache, out, phase):
    mp.spawn(
        _rank_main,
        args=(world, free_port(), os.environ["S3_ENDPOINT_URL"], url, cache, str(out), phase),
        nprocs=world,
        join=True,
    )
    merged = {}
    for rank in range(world):
        with open(out / f"{phase['name']}-{rank}.json") as f:
            part = json.load(f)
        assert not set(part) & set(merged), "a sample was seen by two ranks"
        merged.update(part)
    return merged


@pytest.mark.multiprocess
def test_two_ranks_see_each_sample_exactly_once(s3, tmp_path):
    seen = run_ranks(2, dataset_url("plain"), str(tmp_path / "c"), tmp_path, {"name": "full"})
    assert sorted(map(int, seen)) == list(range(NUM_SAMPLES))


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("resume_world", [2, 1])
def test_resume_mid_epoch_exactly_once_and_same_masks(s3, tmp_path, resume_world):
    url = dataset_url("plain")
    state = str(tmp_path / "state.json")
    before = run_ranks(
        2,
        url,
        str(tmp_path / "c1"),
        tmp_path,
        {"name": "before", "stop_after": 2, "save_to": state},
    )
    after = run_ranks(
        resume_world, url, str(tmp_path / "c2"), tmp_path, {"name": "after", "resume_from": state}
    )
    assert len(before) == 16
    assert not set(before) & set(after)
    assert sorted(map(int, {**before, **after})) == list(range(NUM_SAMPLES))
    # Masks and caption choice are a function of (seed, epoch, sample id): an uninterrupted
    # epoch in one process produces the same masked ids.
    ds = build_dataset(
        [url],
        processor(),
        str(tmp_path / "c3"),
        8,
        shuffle=True,
        num_canonical_nodes=1,
        clean_stale_shm=False,
    )
    reference = {}
    for batch in build_loader(ds, 8, num_workers=0):
        for row, sample_id in enumerate(batch["sample_ids"].tolist()):
            reference[str(sample_id)] = batch["text_ids"][batch["text_image_index"] == row].tolist()
    assert {**before, **after} == reference


# ---- storage outages: a loopback TCP proxy in front of moto (tests/storage_proxy.py) -------


@pytest.fixture
def proxy(s3):
    proxy = StoppableProxy(s3.port)
    saved = os.environ["S3_ENDPOINT_URL"]
    os.environ["S3_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
    yield proxy
    os.environ["S3_ENDPOINT_URL"] = saved
    proxy.forwarding.set()
    proxy.stop()


@pytest.mark.slow
def test_outage_mid_epoch_is_retried_and_epoch_completes_once(proxy, tmp_path):
    url = dataset_url("plain")
    # predownload=4: shards are fetched just ahead of use, so the outage hits real downloads.
    ds = build_dataset(
        [url],
        processor(),
        str(tmp_path),
        4,
        shuffle=False,
        predownload=4,
        # streaming's retry backs off 1, 2, 4, 8, 16 s between attempts: 7 attempts of 2 s
        # outlast a 30 s outage (6 would give up after ~31 s: too close).
        download_timeout=2.0,
        download_retry=7,
        clean_stale_shm=False,
    )
    loader = build_loader(ds, 4, num_workers=1, stall_timeout_s=180)
    batches = iter(loader)
    ids = next(batches)["sample_ids"].tolist()
    outage_s = 30
    proxy.forwarding.clear()
    threading.Timer(outage_s, proxy.forwarding.set).start()
    start = time.monotonic()
    ids += [i for batch in batches for i in batch["sample_ids"].tolist()]
    assert time.monotonic() - start >= outage_s * 0.9  # it really waited out the outage
    assert sorted(ids) == list(range(NUM_SAMPLES))


@pytest.mark.slow
def test_endpoint_that_never_answers_names_the_shard_url(proxy, tmp_path):
    url = dataset_url("plain")
    ds = build_dataset(
        [url],
        processor(),
        str(tmp_path),
        4,
        shuffle=False,
        download_timeout=1.0,
        download_retry=2,
        download_deadline_s=2,  # the default waits out 10 minutes before naming it
        clean_stale_shm=False,
    )
    proxy.forwarding.clear()
    # Streaming fetches the first shards concurrently: whichever gives up first is named.
    with pytest.raises(DataError, match=r"s3://shards/plain/shard\.0000[0-9]\.mds"):
        epoch_ids(build_loader(ds, 4, num_workers=0))


def test_stalled_worker_becomes_error_naming_the_shard(proxy, tmp_path):
    url = dataset_url("plain")
    ds = build_dataset(
        [url],
        processor(),
        str(tmp_path),
        4,
        shuffle=False,
        download_timeout=60.0,
        download_retry=1,
        clean_stale_shm=False,
    )
    proxy.forwarding.clear()
    with pytest.raises(DataError, match=r"stalled.*s3://shards/plain/shard\.000"):
        epoch_ids(build_loader(ds, 4, num_workers=1, stall_timeout_s=4))
