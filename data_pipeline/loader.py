"""The loader: a streaming dataset -> batches (the collate of its task), in worker processes.

`build_loader` returns a `SohoLoader` (a `StreamingDataLoader`): `state_dict()` /
`load_state_dict()` resume mid-epoch exactly once, also on another number of ranks when the
global batch and `num_canonical_nodes` stay fixed. It also
- counts the samples whose image did not decode (`skipped`: the one count of them; the blank
  stand-ins keep every rank's batch count equal, and the training steps leave them out);
- turns a worker's `DataError` into the same one-line error in the training process, and a stall
  longer than `stall_timeout_s` into a `DataError` naming the shards still downloading;
- hands batches over as shared-memory files named in the message (`WorkerInit`).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import multiprocessing
import signal
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from streaming import StreamingDataLoader

from data_pipeline import settings
from data_pipeline.collate import COLLATE_BY_TASK
from data_pipeline.errors import DataError
from data_pipeline.patches import torch_shm_batch_files
from data_pipeline.streaming import SohoStreamingDataset


class WorkerInit:
    """Starts each loader worker: batches then reach the main process as shared-memory files
    named in the message (torch's `file_system` sharing strategy), then `fn` runs.

    With torch's default strategy every tensor of every batch (eight for pre-training) goes as a
    file descriptor, each over its own authenticated connection to the worker, which costs CPU in
    both processes (benchmarks/README.md, data_throughput). torch's shared-memory manager unlinks
    the files of a process that dies.
    """

    def __init__(self, fn: Any = None, ignored_signals: Iterable[int] = ()) -> None:
        self.fn = fn
        self.ignored_signals = tuple(ignored_signals)

    def __call__(self, worker_id: int) -> None:
        for sig in self.ignored_signals:
            signal.signal(sig, signal.SIG_IGN)
        # Blocked since the fork (`SohoLoader.__iter__`); ignored now, so a pending one is dropped.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.ignored_signals)
        torch.multiprocessing.set_sharing_strategy("file_system")
        if self.fn is not None:
            self.fn(worker_id)


class SohoLoader(StreamingDataLoader):
    """StreamingDataLoader that counts fallback samples, turns stalls and worker errors into
    DataError and hands batches over by shared-memory file name (`WorkerInit`, whatever
    `worker_init_fn` is set).

    `worker_ignored_signals`: signals the workers ignore from their first instruction. A
    scheduler signals every process of a job, and the process that iterates decides when to
    stop; a worker that died of the signal would fail that process's next batch. torch's worker
    start installs a SIGTERM handler that re-raises it with the default action (unless the
    parent sent it), so ignoring it in `worker_init_fn` alone leaves a window at every epoch's
    worker start: the signals stay blocked from the fork until `WorkerInit` ignores them. The
    iterating thread gets them once the first batch is in (a caller without its own handler
    sees Ctrl-C then). Workers are forked (`build_loader`): a fork server would fork them from
    a thread that does not block the signals.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.worker_ignored_signals: tuple[int, ...] = ()
        super().__init__(*args, **kwargs)
        if self.num_workers > 0:
            check_worker_tempdir()
            if torch_shm_batch_files.install():
                torch_shm_batch_files.remove_orphans()
            _kill_workers_at_exit()
        self.skipped = 0

    @property
    def worker_init_fn(self) -> WorkerInit:  # read once per iterator, when its workers start
        return WorkerInit(self._init_fn, self.worker_ignored_signals)

    @worker_init_fn.setter
    def worker_init_fn(self, fn: Any) -> None:
        self._init_fn = fn.fn if isinstance(fn, WorkerInit) else fn

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        try:
            batches = super().__iter__()
            # The workers start with the first batch and inherit this thread's signal mask; this
            # process gets the signals that came meanwhile when its mask comes back.
            blocked = self.worker_ignored_signals if self.num_workers > 0 else ()
            with _signals_blocked(blocked):
                first = next(batches, None)
            if first is None:
                return
            for batch in itertools.chain((first,), batches):
                self.skipped += int((~batch["sample_valid"]).sum())
                yield batch
        except Exception as e:
            message = str(e)
            # A worker's error reaches this process as its traceback text; keep its one line
            # (any other wording is raised as it came).
            if "Original Traceback" in message and "DataError:" in message:
                raise DataError(message.rsplit("DataError:", 1)[1].strip()) from e
            if (
                isinstance(e, RuntimeError)
                and "timed out" in message
                and isinstance(self.dataset, SohoStreamingDataset)
            ):
                raise self.stall_error() from e
            raise

    def stall_error(self) -> DataError:
        dataset: SohoStreamingDataset = self.dataset  # type: ignore[assignment]
        stuck = [dataset.shard_url(i) for i in dataset.stuck_shards()]
        where = ", ".join(stuck) if stuck else "no shard download in progress"
        return DataError(
            f"data loader stalled for {self.timeout:.0f} s (stuck: {where}); check the storage "
            "endpoint and that every shard exists"
        )


@contextlib.contextmanager
def _signals_blocked(signals: tuple[int, ...]) -> Iterator[None]:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_kill_at_exit: list[bool] = []


def _kill_workers_at_exit() -> None:
    """At exit, multiprocessing terminates (SIGTERM) its daemon children, loader workers
    included, then joins them; a worker that ignores stop signals (the trainer's keep running
    until the rank has saved) would keep a rank that raised from exiting, and its peers waiting
    in a collective. Killing them first, once registered per process, lets the rank exit."""
    if not _kill_at_exit:
        _kill_at_exit.append(True)
        atexit.register(_kill_daemon_children)  # runs before multiprocessing's own exit handler


def _kill_daemon_children() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def check_worker_tempdir() -> None:
    """Loader workers hand batches over through Unix sockets in the temporary folder
    (multiprocessing's, and torch's shared-memory manager's with `WorkerInit`). A path longer than
    AF_UNIX allows (107 bytes) makes every worker fail or drop its batches (the error only reaches
    stderr) and the loader wait out its stall time-out: fail now."""
    from multiprocessing.connection import arbitrary_address

    length = len(arbitrary_address("AF_UNIX").encode())
    if length > 107:
        raise DataError(
            f"temporary folder {tempfile.gettempdir()} is too long for the data loader workers' "
            f"sockets ({length} > 107 bytes with the socket name); set TMPDIR to a shorter folder"
        )


def build_loader(
    dataset: SohoStreamingDataset,
    batch_size: int,
    num_workers: int = settings.WORKERS,
    stall_timeout_s: float = settings.STALL_TIMEOUT_S,
    persistent_workers: bool = False,
    collate_fn: Any = None,
) -> SohoLoader:
    """The loader for `dataset`, with the collate function of its task unless given."""
    task = dataset.processor.task if dataset.processor else "pretrain"
    return SohoLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn or COLLATE_BY_TASK[task],
        drop_last=False,
        timeout=stall_timeout_s if num_workers > 0 else 0,
        persistent_workers=persistent_workers and num_workers > 0,
        multiprocessing_context="fork" if num_workers > 0 else None,
        prefetch_factor=settings.PREFETCH_FACTOR if num_workers > 0 else None,
    )
