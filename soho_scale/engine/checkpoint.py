"""The checkpoint manager: everything needed to resume a run, saved together and loaded back.

A checkpoint holds DeepSpeed's files (weights, optimizer, LR schedule, the visual dictionary's
buffers), every rank's RNG states and the loader state, step and epoch (`client_state`). Saving
runs on every rank (DeepSpeed hangs otherwise); rank 0 commits it with a manifest once every
node has sealed (fsynced, hashed) and, for s3://, uploaded its files (`checkpoint_store`).
Resuming finds the newest committed checkpoint whose files match their hashes (else the one
before it, with a warning), stages it (a remote one is downloaded once per node; one written by
another number of ranks is converted with DeepSpeed's `ds_to_universal`, since ZeRO refuses a
different data-parallel size: on every node for a remote one, so nodes need share no folder) and
loads it. A local checkpoint.dir across nodes must be on a filesystem they all share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.urls import is_s3_url, join_url
from soho_scale.engine import checkpoint_store as store
from soho_scale.engine import resume_check
from soho_scale.engine.distributed import node_index
from soho_scale.engine.stop import ignore_stop_signals
from soho_scale.spec import Job, dump_job

logger = logging.getLogger(__name__)

STAGING = "checkpoint_staging"  # inside the run folder: remote checkpoints pass through here


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # older files: an ndarray
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_rng_file(path: str) -> dict[str, Any]:
    """A rank's saved RNG states, read with weights_only."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        # Written by a soho_scale that pickled numpy's state as an array: resume has just let
        # DeepSpeed unpickle this folder's own files, so reading this one adds no trust.
        return torch.load(path, weights_only=False)


def spec_hash(job: Job) -> str:
    return hashlib.sha256(dump_job(job).encode()).hexdigest()[:16]


def _local_leader() -> bool:
    return int(os.environ.get("LOCAL_RANK", 0)) == 0


@dataclass(frozen=True)
class Resume:
    """A committed checkpoint made loadable here: DeepSpeed's (root, tag) and whether it is a
    universal conversion (load it with `load_universal`)."""

    found: store.Committed
    local_root: str
    tag: str
    universal: bool
    run_id: str | None = None  # the job's MLflow run, reopened so one job stays one run
    changes: tuple[resume_check.Change, ...] = ()  # spec changes since the checkpoint


class CheckpointManager:
    """Save, commit, find, stage and load the checkpoints of one job's run."""

    def __init__(self, job: Job, run_dir: str):
        self.job = job
        self.root = job.checkpoint.dir
        self.remote = is_s3_url(self.root)
        # One staging folder per node: nodes that share the run folder must not write, upload
        # and remove each other's files; nodes that share nothing each stage their own copy.
        self.staging = os.path.join(run_dir, STAGING, f"node{node_index()}")
        self.run_id: str | None = None  # the MLflow run, committed with every checkpoint

    # ---- saving ------------------------------------------------------------------------------

    def save(self, engine: Any, step: int, epoch: int, loader: Any) -> None:
        """Every rank writes its part; rank 0 commits (manifest), and prunes old checkpoints."""
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

        local_root = self.staging if self.remote else self.root
        tag = store.tag_for(step)
        folder = os.path.join(local_root, tag)
        # A save of this step killed earlier (or a checkpoint replaced after a resume from an
        # older one) left files there, maybe of another number of ranks: start from nothing.
        if dist.get_rank() == 0:
            store.remove(join_url(self.root, tag))
        if self.remote and _local_leader():
            shutil.rmtree(folder, ignore_errors=True)
        dist.barrier()
        client_state = {
            "step": step,
            "epoch": epoch,
            "loader": loader.state_dict(),
            "spec_hash": spec_hash(self.job),
            "world_size": dist.get_world_size(),
            UNIVERSAL_CHECKPOINT_INFO: {},  # lets ds_to_universal reshape it to another world
        }
        engine.save_checkpoint(local_root, tag=tag, client_state=client_state, save_latest=False)
        rank = dist.get_rank()
        torch.save(rng_state(), os.path.join(folder, f"rng_rank{rank:05d}.pt"))
        dist.barrier()
        # One process per node seals (fsync, sha256) and uploads what its node wrote; rank 0
        # commits the union, so the manifest only ever names durable, uploaded files.
        files: dict[str, tuple[int, str]] = {}
        if _local_leader():
            files = store.seal(folder)
            if self.remote:
                store.upload_files(folder, join_url(self.root, tag), files)
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, files)
        if rank == 0:
            self._commit(
                folder, tag, step, {k: v for part in every for k, v in (part or {}).items()}
            )
        dist.barrier()
        if self.remote and _local_leader():
            shutil.rmtree(folder, ignore_errors=True)

    def _commit(self, folder: str, tag: str, step: int, files: dict[str, tuple[int, str]]) -> None:
        extra = {
            "spec_hash": spec_hash(self.job),
            "world_size": dist.get_world_size(),
            "task": self.job.data.task,
            "model_config": dataclasses.asdict(self.job.model.config()),
            "mlflow_run_id": self.run_id,
            "spec": resume_check.spec_tree(self.job),  # what a resume compares its job with
        }
        if self.remote:
            store.put_manifest(join_url(self.root, tag), store.manifest_for(step, files, extra))
        else:
            store.write_manifest(folder, step, extra, files)
        store.prune(self.root, self.job.checkpoint.keep_last)
        logger.info("checkpoint %s committed", join_url(self.root, tag))

    # ---- resuming ----------------------------------------------------------------------------

    def find(self) -> store.Committed | None:
        """The checkpoint `checkpoint.resume` names (`checkpoint_store.resume_point`)."""
        return store.resume_point(self.root, self.job.checkpoint.resume)

    def _stage_verified(self) -> tuple[store.Committed, str, dict[str, Any]] | None:
        """(checkpoint, local root, manifest) of the checkpoint to resume from, its files checked
        against the manifest's sha256 (a remote one downloaded, once per node). Under `auto` a
        newest checkpoint that fails the check gives way to the one before it, with a warning."""
        newest = self.find()
        chain = [newest] if newest else []
        if newest and self.job.checkpoint.resume == "auto":
            older = store.committed_checkpoints(self.root, warn=False)
            chain += [c for c in reversed(older) if c.step < newest.step]
        for index, found in enumerate(chain):
            remote = is_s3_url(found.location)
            local_root = self.staging if remote else os.path.dirname(found.location)
            problem = None
            if _local_leader() if remote else dist.get_rank() == 0:
                problem = _check(found, local_root, self.staging)
            every: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(every, problem)
            problem = next((p for p in every if p), None)
            if problem is None:
                manifest = store.read_local_manifest(os.path.join(local_root, found.tag))
                return found, local_root, manifest
            if index == len(chain) - 1:
                raise store.CheckpointError(problem)
            logger.warning("%s; resuming from %s instead", problem, chain[index + 1].location)
        return None

    def prepare_resume(self, world: int) -> Resume | None:
        """Find the checkpoint to resume from and make it loadable here (every rank calls it,
        before `deepspeed.initialize`: a universal checkpoint changes the engine's config)."""
        staged = self._stage_verified()
        if staged is None:
            return None
        found, local_root, manifest = staged
        changes = resume_check.check(self.job, manifest, found.location)  # may refuse
        saved_world, run_id = manifest.get("world_size", world), manifest.get("mlflow_run_id")
        if saved_world == world:
            return Resume(found, local_root, found.tag, False, run_id=run_id, changes=changes)
        universal = f"{found.tag}_universal_for{world}"
        # A remote checkpoint is staged on every node, and every node converts its own copy (no
        # filesystem need be shared); a local one is one folder all nodes see: rank 0 converts.
        converts = _local_leader() if local_root == self.staging else dist.get_rank() == 0
        if converts and not os.path.isdir(os.path.join(local_root, universal)):
            logger.info(
                "checkpoint from %d ranks, resuming on %d: converting to universal",
                saved_world,
                world,
            )
            _to_universal(os.path.join(local_root, found.tag), os.path.join(local_root, universal))
        dist.barrier()
        return Resume(found, local_root, universal, universal=True, run_id=run_id, changes=changes)

    def load(self, engine: Any, resume: Resume) -> dict[str, Any]:
        """Load weights, optimizer and schedule into `engine`, this rank's RNG states into the
        process; returns the client state (step, epoch, loader)."""
        path, client_state = engine.load_checkpoint(
            resume.local_root, tag=resume.tag, load_module_strict=True
        )
        if path is None:
            raise ValueError(f"checkpoint {resume.found.location}: DeepSpeed could not load it")
        rng_file = os.path.join(
            resume.local_root, resume.found.tag, f"rng_rank{dist.get_rank():05d}.pt"
        )
        if os.path.exists(rng_file):
            set_rng_state(read_rng_file(rng_file))
        dist.barrier()  # every rank of the node has read the staged copy
        if resume.local_root == self.staging and _local_leader():
            shutil.rmtree(self.staging, ignore_errors=True)
        return client_state


def _check(found: store.Committed, local_root: str, staging: str) -> str | None:
    """Why `found` cannot be loaded (a file damaged, missing or unreadable), or None; a remote
    one is downloaded into `staging` first."""
    try:
        if is_s3_url(found.location):  # nothing else of this node's run is staged while it starts
            shutil.rmtree(staging, ignore_errors=True)
            store.download(found.location, os.path.join(local_root, found.tag))
        else:
            store.verify(os.path.join(local_root, found.tag), found.location)
    except store.CheckpointError as e:
        return str(e)
    except OSError as e:
        return f"checkpoint {found.location}: unreadable ({e})"
    return None


def _to_universal(source: str, target: str) -> None:
    """DeepSpeed's ds_to_universal into `target` (written under a temporary name, then renamed)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            source,
            "--output_folder",
            target + ".tmp",
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        preexec_fn=ignore_stop_signals,  # a stop signal to the job must not kill the conversion
    )
    os.replace(target + ".tmp", target)
