"""The loader (data_pipeline.loader): batches from worker processes, handed over by name, with
fallback samples counted and worker errors kept to one line."""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile

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


def test_workers_outlive_a_stop_signal_at_their_start(monkeypatch):
    # A scheduler's SIGTERM (not from the parent) reaches every worker just after torch's worker
    # start installs its SIGTERM handler, the moment that used to kill a starting worker. The
    # workers run on, each epoch (new workers each) is whole, and this process's signal mask
    # comes back as it was. The signals are set before the init function: the order is free.
    from torch.utils.data._utils import signal_handling

    install = signal_handling._set_worker_signal_handlers

    def install_then_stop(*args: object) -> None:
        install(*args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(signal_handling, "_set_worker_signal_handlers", install_then_stop)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    loader = SohoLoader(_WorkerFacts(), batch_size=1, num_workers=2, multiprocessing_context="fork")
    loader.worker_ignored_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    loader.worker_init_fn = _tag_worker
    for _ in range(2):
        assert [b["tag"] for b in loader] == [["set in worker 0"], ["set in worker 1"]]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask


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
