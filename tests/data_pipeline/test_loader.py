"""The loader (data_pipeline.loader): batches from worker processes, handed over by name, with
fallback samples counted and worker errors kept to one line."""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import threading

import pytest
import torch

from data_pipeline.errors import DataError
from data_pipeline.loader import SohoLoader, build_loader
from data_pipeline.streaming import build_dataset
from tests.data_pipeline.helpers import NUM_SAMPLES, dataset_url, epoch_ids, processor


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


def _children() -> set[int]:
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.add(int(pid))
        except OSError:
            pass  # gone meanwhile
    return found


def test_workers_outlive_stop_signals_from_their_fork_on():
    # A scheduler signals every process of a job, so also loader workers that are just starting
    # (every epoch starts new ones). SIGTERM to every new child of this process, without pause,
    # while six epochs go by: none may die of it, and this process's mask comes back as it was.
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # as the trainer's StopFlag
    others, done = _children(), threading.Event()

    def storm() -> None:
        while not done.is_set():
            for pid in _children() - others:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    sender = threading.Thread(target=storm, daemon=True)
    try:
        loader = SohoLoader(_WorkerFacts(), batch_size=1, num_workers=2)
        loader.worker_init_fn = _tag_worker
        loader.worker_ignored_signals = stops
        sender.start()
        for _ in range(6):
            batches = list(loader)
            assert [b["tag"] for b in batches] == [["set in worker 0"], ["set in worker 1"]]
    finally:
        done.set()
        sender.join()
        signal.signal(signal.SIGTERM, previous)
    assert not set(stops) & signal.pthread_sigmask(signal.SIG_BLOCK, [])


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
