"""Streaming datasets and loader against a real moto_server S3 API and real gloo ranks."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import pickle
import socket
import tempfile
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from streaming import MDSWriter, StreamingDataset

import data_pipeline.streaming as streaming_module
from data_pipeline.storage import DataError, LocalS3Server, free_port, s3_client
from data_pipeline.streaming import SampleProcessor, SohoLoader, build_dataset, build_loader
from data_pipeline.transforms import ImageTransform

NUM_SAMPLES = 40
COLUMNS = {"source": "str", "split": "str", "image_id": "str", "image": "bytes", "captions": "json"}


@pytest.fixture(scope="module")
def s3():
    with LocalS3Server(["shards"]) as server:
        yield server


def jpeg(i: int) -> bytes:
    image = Image.new("RGB", (40 + 10 * (i % 3), 30 + 20 * (i % 2)), (i * 7 % 255, 100, 50))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def write_shards(
    out: str, n: int = NUM_SAMPLES, corrupt: tuple[int, ...] = (), compression: str | None = None
) -> None:
    """Caption shards in the contract's layout; ~3 samples per shard."""
    with MDSWriter(out=out, columns=COLUMNS, hashes=["sha1", "xxh64"], size_limit=3000,
                   compression=compression) as w:  # fmt: skip
        for i in range(n):
            image = b"\xff\xd8 not a jpeg" if i in corrupt else jpeg(i)
            captions = [f"a photo number {i}", f"picture {i} of a thing", f"image {i}"]
            w.write(
                {
                    "source": "coco",
                    "split": "train",
                    "image_id": str(i),
                    "image": image,
                    "captions": captions,
                }
            )


_written: set[str] = set()


def dataset_url(name: str, **kwargs) -> str:
    url = f"s3://shards/{name}"
    if url not in _written:
        write_shards(url, **kwargs)
        _written.add(url)
    return url


def processor(task: str = "pretrain") -> SampleProcessor:
    return SampleProcessor(task, image=ImageTransform(32, 48), captions_per_image=2, seed=5)


def epoch_ids(loader) -> list[int]:
    return [i for batch in loader for i in batch["sample_ids"].tolist()]


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


def test_local_shards_are_read_as_streaming_decodes_them(tmp_path, monkeypatch):
    # Shards on disk are read through at most _MAX_OPEN_SHARDS memory mappings, not through
    # streaming's reader: every column, fixed-size ones too, must decode the same.
    monkeypatch.setattr(streaming_module, "_MAX_OPEN_SHARDS", 2)
    folder = str(tmp_path / "mixed")
    columns = {"image": "bytes", "label": "int", "score": "float32", "captions": "json",
               "note": "str"}  # fmt: skip
    with MDSWriter(out=folder, columns=columns, size_limit=2000) as writer:
        for i in range(12):
            writer.write({"image": jpeg(i), "label": i - 5, "score": i / 4, "captions": [f"c {i}"],
                          "note": "é" * (i % 3)})  # fmt: skip
    plain = StreamingDataset(local=folder, shuffle=False, batch_size=4)
    ds = build_dataset([folder], None, str(tmp_path / "cache"), 4, shuffle=False,
                       clean_stale_shm=False)  # fmt: skip
    assert ds.num_shards >= 4
    for i in range(ds.num_samples):
        assert {**plain[i], "sample_id": i} == ds[i]
        assert 1 <= len(ds._open_shards) <= 2
    last = ds.num_shards - 1
    assert list(ds._open_shards) == [last - 1, last]
    first_of = ds.sample_offset_per_shard.tolist()
    ds[first_of[last - 1]]  # read again: now the most recently read ...
    ds[first_of[0]]  # ... so this one unmaps the other
    assert list(ds._open_shards) == [last - 1, 0]
    copy = pickle.loads(pickle.dumps(ds))  # as for spawned workers: mappings stay behind
    assert copy._open_shards == {} and copy[3] == ds[3]
    assert type(copy._shared_barrier) is streaming_module._PollingBarrier


def _barrier_rounds(barrier, arrived, rounds, procs, late):
    for r in range(rounds):
        if r in late:
            time.sleep(0.05)
        with arrived.get_lock():
            arrived.value += 1
        barrier(procs)
        if arrived.value < (r + 1) * procs:  # someone got through before all had arrived
            raise SystemExit(1)


def test_worker_barrier_holds_every_process_until_all_arrive(tmp_path):
    # The loader's workers meet at this barrier three times each epoch (streaming's protocol,
    # our lock and polling); a process that passes early would read a partition not yet shared.
    procs, rounds = 3, 25
    barrier = streaming_module._PollingBarrier(str(tmp_path / "lock"), f"soho_test_{os.getpid()}")
    barrier(1)  # the parent opens its lock file first: forked copies must open their own
    ctx = multiprocessing.get_context("fork")
    arrived = ctx.Value("i", 0)
    workers = [
        ctx.Process(target=_barrier_rounds, args=(barrier, arrived, rounds, procs, {i, 7 + i}))
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0] * procs
    assert arrived.value == procs * rounds


class _WorkerFacts(torch.utils.data.IterableDataset):
    def __iter__(self):
        by_name = torch.multiprocessing.get_sharing_strategy() == "file_system"
        yield {
            "sample_ids": 0,
            "sample_valid": True,
            "by_name": by_name,
            "tag": os.environ["SOHO_TAG"],
        }


def _tag_worker(worker_id: int) -> None:
    os.environ["SOHO_TAG"] = f"set in worker {worker_id}"


def test_loader_workers_hand_batches_over_by_name_and_run_the_set_init_fn():
    # The trainer sets its own worker_init_fn after build_loader; both must run in the worker.
    loader = SohoLoader(_WorkerFacts(), batch_size=1, num_workers=1)
    loader.worker_init_fn = _tag_worker
    [batch] = list(loader)
    assert batch["by_name"].tolist() == [True] and batch["tag"] == ["set in worker 0"]
    assert torch.multiprocessing.get_sharing_strategy() == "file_descriptor"  # parent unchanged


def test_batch_files_of_dead_workers_are_removed(tmp_path):
    dead = multiprocessing.get_context("fork").Process(target=int)
    dead.start()
    dead.join()
    for name in (f"torch_{dead.pid}_12_3", f"torch_{os.getpid()}_12_3", "torch_x_1", "other_1_2"):
        (tmp_path / name).write_bytes(b"batch")
    assert streaming_module.remove_orphan_batch_files(str(tmp_path)) == [f"torch_{dead.pid}_12_3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"torch_{os.getpid()}_12_3", "torch_x_1", "other_1_2"]
    )


def test_one_process_epoch_exactly_once_with_workers(s3, tmp_path):
    ds = build_dataset([dataset_url("plain")], processor(), str(tmp_path), 4, clean_stale_shm=False)
    loader = build_loader(ds, 4, num_workers=2)
    ids = epoch_ids(loader)
    assert sorted(ids) == list(range(NUM_SAMPLES))
    batch = next(iter(loader))
    assert batch["text_ids"].shape == (8, 16) and batch["text_image_index"].tolist() == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    assert (batch["mlm_labels"] != -100).any()


def test_temp_folder_too_long_for_worker_sockets_fails_at_once(s3, tmp_path, monkeypatch):
    # Workers hand batches over through a Unix socket in TMPDIR; with a path over the AF_UNIX
    # limit every batch is dropped and the loader would wait out its stall time-out.
    ds = build_dataset([dataset_url("plain")], processor(), str(tmp_path), 4, clean_stale_shm=False)
    long_tmp = tmp_path / ("t" * 60) / ("u" * 40)
    long_tmp.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(long_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    # multiprocessing's own folder (pymp-*) lies in TMPDIR; it is made once per process.
    monkeypatch.setitem(multiprocessing.current_process()._config, "tempdir", str(long_tmp))
    with pytest.raises(DataError, match="too long for the data loader workers' sockets.*TMPDIR"):
        build_loader(ds, 4, num_workers=1)
    assert list(build_loader(ds, 4, num_workers=0))  # in-process loading needs no socket


def test_corrupt_jpeg_is_replaced_and_counted(s3, tmp_path):
    url = dataset_url("corrupt", corrupt=(3, 17))
    ds = build_dataset([url], processor(), str(tmp_path), 4, shuffle=False, clean_stale_shm=False)
    loader = build_loader(ds, 4, num_workers=2)
    batches = list(loader)
    assert len(batches) == NUM_SAMPLES // 4  # nothing dropped
    invalid = [
        i
        for b in batches
        for i, ok in zip(b["sample_ids"].tolist(), b["sample_valid"].tolist())
        if not ok
    ]
    assert sorted(invalid) == [3, 17]
    assert loader.skipped == 2


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
    from data_pipeline.streaming import StreamSource

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


# ---- storage outages: a loopback TCP proxy in front of moto ---------------------------------


class PausableProxy:
    """Forwards 127.0.0.1:port to a target; while paused it accepts but relays nothing."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.forwarding = threading.Event()
        self.forwarding.set()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self.forwarding.wait()
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:  # the server is gone (end of the test module)
            client.close()
            return
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.forwarding.wait()  # an outage stalls open connections too
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.forwarding.set()
        self.server.close()


@pytest.fixture
def proxy(s3):
    proxy = PausableProxy(s3.port)
    saved = os.environ["S3_ENDPOINT_URL"]
    os.environ["S3_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
    yield proxy
    os.environ["S3_ENDPOINT_URL"] = saved
    proxy.close()


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
