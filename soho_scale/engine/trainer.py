"""The trainer: build -> deepspeed.initialize -> loop {batch; forward; backward; step; log;
checkpoint}. One process per rank (started by the DeepSpeed launcher); the same code runs on CPU
over gloo and on GPUs over NCCL.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.storage import free_port
from soho_scale.engine import checkpoint as ckpt
from soho_scale.engine.cpu import (
    keep_freed_memory,
    release_shm_allreduce_segment,
    share_cores,
    tune_for_cpu,
    use_shm_collectives,
)
from soho_scale.engine.optimizer import build_optimizer, lr_factor
from soho_scale.engine.telemetry import FlopModel, Throughput
from soho_scale.engine.tracking import flatten, make_tracker
from soho_scale.model.soho import SohoPretrain
from soho_scale.objectives import PretrainSettings, pretrain_loss
from soho_scale.spec import Job, build_deepspeed_config, derived, dump_job

logger = logging.getLogger("soho_scale.train")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: saved a checkpoint on SIGTERM/SIGINT; relaunch resumes


class PretrainStep(nn.Module):
    """What DeepSpeed wraps: the model and its objective. forward(batch) -> (loss, metrics)."""

    def __init__(self, model: SohoPretrain, settings: PretrainSettings):
        super().__init__()
        self.model = model
        self.settings = settings

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return pretrain_loss(self.model, batch, self.settings)


def pretrain_settings(job: Job) -> PretrainSettings:
    return PretrainSettings(**job.objectives.model_dump(exclude={"mlm_probability"}))


def setup_distributed() -> tuple[int, int]:
    """Join the process group the launcher describes (a lone process makes a group of one)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    # The DeepSpeed launcher sets LOCAL_SIZE; streaming reads LOCAL_WORLD_SIZE (default 1, which
    # makes every rank a "node leader" and breaks its shared-memory set-up).
    if "LOCAL_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["LOCAL_SIZE"])
    if not torch.cuda.is_available():  # a CPU rank (engine/cpu.py)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        keep_freed_memory()  # DeepSpeed re-allocates its buffers every step
        share_cores(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        # DeepSpeed sets up its shared-memory all-reduce only when LOCAL_SIZE (its launcher's
        # name) equals the world size; spawned ranks name it LOCAL_WORLD_SIZE.
        local = os.environ.get("LOCAL_WORLD_SIZE", "1")
        if local != "1" and local == os.environ.get("WORLD_SIZE"):  # (a lone rank needs none)
            os.environ.setdefault("LOCAL_SIZE", local)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:  # every rank has mapped every segment once all have passed init_distributed
        dist.barrier()
        release_shm_allreduce_segment(dist.get_rank())
        use_shm_collectives()
    return dist.get_rank(), dist.get_world_size()


def prepare_for_engine(step_module: nn.Module, job: Job, world: int) -> tuple[dict, torch.dtype]:
    """Cast `step_module` to the job's precision and build its DeepSpeed config: what the trainer
    (and the benchmarks and tests that mirror it) do before `deepspeed.initialize`.

    The cast comes first because DeepSpeed's bf16/fp16 engine converts parameters only, and
    BatchNorm then meets low-precision inputs with fp32 running statistics (the VD keeps itself
    fp32). The config's buckets are cut to the module's size; CPU ranks get engine/cpu.py's
    settings; ZeRO-3 gets engine/zero3.py's optimizer (no second fp32 copy of the weights in
    fp32). Returns (config, dtype of the batches' floating tensors)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(job.precision, torch.float32)
    step_module.to(dtype)
    num_params = sum(p.numel() for p in step_module.parameters())
    config = build_deepspeed_config(job, world, num_params)
    if job.deepspeed.zero_stage == 3:
        from soho_scale.engine import zero3  # imports deepspeed: after setup_distributed

        zero3.install()
    return (config if torch.cuda.is_available() else tune_for_cpu(config)), dtype


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    if rank != 0:
        logging.getLogger("soho_scale").setLevel(logging.WARNING)


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (run ids and paths: never per-rank timestamps)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def spec_hash(job: Job) -> str:
    return hashlib.sha256(dump_job(job).encode()).hexdigest()[:16]


def build_step(job: Job) -> nn.Module:
    """The module DeepSpeed wraps: `.model` plus the task's objective (forward -> loss, metrics)."""
    config = job.model.config()
    if job.data.task == "pretrain":
        step = PretrainStep(SohoPretrain(config), pretrain_settings(job))
    else:
        from soho_scale.tasks import build_task_step

        step = build_task_step(job, config)
    if job.model.init_from:
        from soho_scale.tasks.transfer import load_initial_weights

        load_initial_weights(step.model, job.model.init_from)
    if config.bn_policy == "sync" and dist.get_world_size() > 1:
        step = nn.SyncBatchNorm.convert_sync_batchnorm(step)
    return step


def build_data(job: Job, run_dir: str, micro_batch: int):
    from data_pipeline.streaming import StreamSource, build_dataset, build_loader
    from soho_scale.tasks import sample_processor

    data = job.data
    processor = sample_processor(job)
    sources = [StreamSource(s.remote, s.proportion) for s in data.streams]

    dataset = build_dataset(
        sources,
        processor,
        # One cache per node (two "nodes" on one machine must not share streaming's folders).
        cache_root=os.path.join(
            data.cache_dir or os.path.join(run_dir, "shard_cache"),
            f"node{os.environ.get('CROSS_RANK', '0')}",
        ),
        batch_size=micro_batch,
        shuffle=data.shuffle,
        shuffle_seed=job.seed + 9176,
        num_canonical_nodes=data.num_canonical_nodes or job.resources.nodes,
        download_retry=data.download_retry,
        download_timeout=data.download_timeout,
        validate_hash=data.validate_hash,
    )
    loader = build_loader(
        dataset,
        batch_size=micro_batch,
        num_workers=data.workers,
        stall_timeout_s=data.stall_timeout_s,
    )
    return dataset, loader


def dataset_lineage(job: Job) -> dict[str, str]:
    from data_pipeline.storage import read_bytes

    lineage = {}
    for i, stream in enumerate(job.data.streams):
        remote = stream.remote
        index = read_bytes(
            f"{remote.rstrip('/')}/index.json"
            if remote.startswith("s3://")
            else os.path.join(remote, "index.json")
        )
        shards = json.loads(index)["shards"]
        lineage[f"data.stream{i}.url"] = remote
        lineage[f"data.stream{i}.index_sha256"] = hashlib.sha256(index).hexdigest()
        lineage[f"data.stream{i}.samples"] = str(sum(s["samples"] for s in shards))
        lineage[f"data.stream{i}.shards"] = str(len(shards))
    return lineage


def _to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM/SIGINT: a scheduler signals every process of the job,
    and the rank (not its workers) decides when to stop, after saving a checkpoint."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopFlag:
    """SIGTERM/SIGINT (preemption) asks for a checkpoint at the next step; all ranks agree."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        logger.warning("received %s: checkpointing at the next step", signal.Signals(signum).name)
        self.requested = True

    def any_rank(self, device: torch.device) -> bool:
        # On the engine's device: NCCL reduces CUDA tensors only.
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def save_checkpoint(engine, job: Job, run_dir: str, step: int, epoch: int, loader) -> None:
    """Every rank writes its part; rank 0 commits (manifest), uploads and prunes."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    root = job.checkpoint.dir
    remote = root.startswith("s3://")
    local_root = os.path.join(run_dir, "checkpoint_staging") if remote else root
    tag = ckpt.tag_for(step)
    client_state = {
        "step": step,
        "epoch": epoch,
        "loader": loader.state_dict(),
        "spec_hash": spec_hash(job),
        "world_size": dist.get_world_size(),
        UNIVERSAL_CHECKPOINT_INFO: {},  # lets ds_to_universal reshape it to another world size
    }
    engine.save_checkpoint(local_root, tag=tag, client_state=client_state, save_latest=False)
    rank = dist.get_rank()
    folder = os.path.join(local_root, tag)
    torch.save(rng_state(), os.path.join(folder, f"rng_rank{rank:05d}.pt"))
    dist.barrier()
    # One process per node lists (and uploads) what its node wrote; rank 0 commits the union.
    files: dict[str, int] = {}
    local_leader = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if local_leader:
        files = ckpt.list_files(folder)
        if remote:
            ckpt.upload_files(folder, ckpt.join(root, tag), files)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, files)
    if rank == 0:
        extra = {
            "spec_hash": spec_hash(job),
            "world_size": dist.get_world_size(),
            "task": job.data.task,
            "model_config": dataclasses.asdict(job.model.config()),
        }
        union = {k: v for part in every for k, v in (part or {}).items()}
        if remote:
            ckpt.put_manifest(ckpt.join(root, tag), {"step": step, "files": union, **extra})
        else:
            ckpt.write_manifest(folder, step, extra, union)
        ckpt.prune(root, job.checkpoint.keep_last)
        logger.info("checkpoint %s committed", ckpt.join(root, tag))
    dist.barrier()
    if remote and local_leader:
        shutil.rmtree(folder, ignore_errors=True)


def find_resume(job: Job) -> ckpt.Committed | None:
    resume = job.checkpoint.resume
    if resume == "never":
        return None
    if resume == "auto":
        found = ckpt.committed_checkpoints(job.checkpoint.dir)
        return found[-1] if found else None
    location = resume.rstrip("/")
    if not ckpt.is_complete(location):
        raise ValueError(f"checkpoint.resume: {resume} is not a complete checkpoint (no manifest)")
    tag = location.rsplit("/", 1)[-1]
    match = ckpt.TAG_PATTERN.match(tag)
    return ckpt.Committed(int(match.group(1)) if match else 0, tag, location)


def stage_checkpoint(found: ckpt.Committed, run_dir: str, world: int) -> tuple[str, str, bool]:
    """Make a committed checkpoint loadable here: (local root, tag, universal?).

    Remote checkpoints are downloaded (one process per node). A checkpoint written by another
    number of ranks is converted with DeepSpeed's ds_to_universal (ZeRO refuses to load a
    different data-parallel size otherwise) and loaded with `load_universal`.
    """
    local_root = os.path.dirname(found.location)
    if found.location.startswith("s3://"):
        local_root = os.path.join(run_dir, "checkpoint_staging")
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            shutil.rmtree(os.path.join(local_root, found.tag), ignore_errors=True)
            ckpt.download(found.location, os.path.join(local_root, found.tag))
        dist.barrier()
    with open(os.path.join(local_root, found.tag, ckpt.MANIFEST)) as f:
        saved_world = json.load(f).get("world_size", world)
    if saved_world == world:
        return local_root, found.tag, False
    universal = f"{found.tag}_universal_for{world}"
    if dist.get_rank() == 0 and not os.path.isdir(os.path.join(local_root, universal)):
        logger.info(
            "checkpoint from %d ranks, resuming on %d: converting to universal", saved_world, world
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                os.path.join(local_root, found.tag),
                "--output_folder",
                os.path.join(local_root, universal + ".tmp"),
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        os.replace(
            os.path.join(local_root, universal + ".tmp"), os.path.join(local_root, universal)
        )
    dist.barrier()
    return local_root, universal, True


def load_checkpoint(engine, local_root: str, tag: str, found: ckpt.Committed) -> dict[str, Any]:
    path, client_state = engine.load_checkpoint(local_root, tag=tag, load_module_strict=True)
    if path is None:
        raise ValueError(f"checkpoint {found.location}: DeepSpeed could not load it")
    rng_file = os.path.join(local_root, found.tag, f"rng_rank{dist.get_rank():05d}.pt")
    if os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def train(job: Job, run_dir: str | None = None) -> dict[str, Any]:
    rank, world = setup_distributed()
    setup_logging(rank)
    run_dir = broadcast(
        os.path.abspath(run_dir or os.path.join("runs", job.name)) if rank == 0 else None
    )
    os.makedirs(run_dir, exist_ok=True)
    import deepspeed

    # Same seed for the model on every rank (DeepSpeed broadcasts parameters, not buffers such as
    # the visual dictionary), then a per-rank seed for dropout and the objective's sampling.
    seed_everything(job.seed)
    step_module = build_step(job)
    if torch.cuda.is_available():  # NCCL broadcasts device tensors only
        step_module.to(torch.device("cuda", torch.cuda.current_device()))
    for buffer in step_module.buffers():
        dist.broadcast(buffer, src=0)
    seed_everything(job.seed + rank)
    ds_config, dtype = prepare_for_engine(step_module, job, world)
    optimizer = build_optimizer(step_module, job.optim)
    micro = job.batch.micro_batch_per_rank

    dataset, loader = build_data(job, run_dir, micro)
    # Worker seeds from the loader's own generator: the global RNG (checkpointed) is not touched,
    # so a resumed run draws exactly what the uninterrupted one drew.
    loader.generator = torch.Generator().manual_seed(job.seed + 1000 * rank)
    loader.worker_init_fn = ignore_stop_signals
    numbers = derived(job, num_samples=dataset.num_samples, world_size=world)
    total_steps = numbers["total_steps"]
    schedule = functools.partial(
        lr_factor,
        warmup_steps=job.schedule.warmup_steps,
        warmup_start_factor=job.schedule.warmup_start_factor,
        decay_steps=numbers["decay_steps"] or [],
        gamma=job.schedule.gamma,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    found = find_resume(job)
    if found is not None:
        local_root, tag, universal = stage_checkpoint(found, run_dir, world)
        if universal:
            ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=step_module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
    )
    step, epoch = 0, 0
    if found is not None:
        state = load_checkpoint(engine, local_root, tag, found)
        step, epoch = state["step"], state["epoch"]
        loader.load_state_dict(state["loader"])
        logger.info("resumed from %s at step %d", found.location, step)

    tracker = make_tracker(
        rank, run_dir, job.tracking.experiment, job.tracking.run_name or job.name, job.tracking.tags
    )
    if found is None:
        params = flatten(json.loads(job.model_dump_json(exclude={"overrides"})))
        params.update({f"derived.{k}": str(v) for k, v in numbers.items()})
        params["overrides"] = " ".join(job.overrides) or "-"
        params.update(environment_params())
        if rank == 0:
            params.update(dataset_lineage(job))
        tracker.log_params(params)
        spec_file = os.path.join(run_dir, "resolved_spec.yaml")
        if rank == 0:
            with open(spec_file, "w") as f:
                f.write(dump_job(job))
        tracker.log_artifact(spec_file)

    stop = StopFlag()
    flops = FlopModel(job.model.config())
    peak = float(os.environ["SOHO_PEAK_FLOPS"]) if os.environ.get("SOHO_PEAK_FLOPS") else None
    meter = Throughput()
    progress = _progress(rank, total_steps, step)
    last_metrics: dict[str, float] = {}
    skipped = 0
    loss_history: list[float] = []
    seen_samples: list[int] = []
    record_samples = bool(os.environ.get("SOHO_RECORD_SAMPLES"))
    preempted = False
    while step < total_steps and not preempted:
        wait_start = time.perf_counter()
        for batch in loader:
            data_wait = time.perf_counter() - wait_start
            skipped += int((~batch["sample_valid"]).sum()) if "sample_valid" in batch else 0
            if record_samples:
                seen_samples += batch["sample_ids"].tolist()
            tokens = int(batch["text_mask"].sum())  # counted on the host: no device sync
            batch = _to_device(batch, engine.device, dtype)
            loss, metrics = engine(batch)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            meter.add(
                batch["images"].shape[0],
                tokens,
                flops.forward_flops(batch, int(metrics.get("mlm_count", 0))),
                data_wait,
            )
            if boundary:
                step += 1
                if record_samples:  # reading the loss every step would sync the device
                    loss_history.append(float(loss.detach()))
                if step % job.tracking.log_every == 0 or step == total_steps:
                    last_metrics = _step_metrics(engine, metrics, meter, world, peak, skipped)
                    tracker.log_metrics(last_metrics, step)
                    meter.reset()
                progress(step, last_metrics.get("loss"), last_metrics.get("samples_per_s"))
                preempted = stop.any_rank(engine.device)
                if preempted or step % job.checkpoint.interval_steps == 0 or step == total_steps:
                    save_checkpoint(engine, job, run_dir, step, epoch, loader)
                if preempted or step >= total_steps:
                    break
            wait_start = time.perf_counter()
        else:
            epoch += 1
    summary = {
        "job": job.name,
        "steps": step,
        "epoch": epoch,
        "world_size": world,
        "preempted": preempted,
        "final_metrics": last_metrics,
        "run_dir": run_dir,
        "run_id": tracker.run_id,
    }
    if record_samples:
        _write_rank_record(run_dir, rank, loss_history, seen_samples, found)
    if rank == 0:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        tracker.log_artifact(os.path.join(run_dir, "summary.json"))
    tracker.finish("KILLED" if preempted else "FINISHED")
    dist.barrier()
    if preempted:
        logger.warning("stopped by signal after step %d; checkpoint saved", step)
        sys.exit(PREEMPTED_EXIT_CODE)
    return summary


def _write_rank_record(run_dir, rank, losses, samples, found) -> None:  # noqa: ANN001
    # For the resume tests: what this process trained on and the losses it saw.
    start = found.step if found else 0
    with open(os.path.join(run_dir, f"record_rank{rank}_from{start}.json"), "w") as f:
        json.dump({"start_step": start, "losses": losses, "samples": samples}, f)


def _step_metrics(engine, metrics, meter, world, peak, skipped) -> dict[str, float]:  # noqa: ANN001
    out = {k: float(v) for k, v in metrics.items() if not torch.isnan(torch.as_tensor(v))}
    for name, lr in zip(("cnn", "rest"), engine.get_lr()):
        out[f"lr_{name}"] = float(lr)
    norm = engine.get_global_grad_norm()
    if norm is not None:
        out["grad_norm"] = float(norm)
    scale = getattr(engine.optimizer, "cur_scale", None)
    if scale is not None:
        out["loss_scale"] = float(scale)
    out.update(meter.summary(world, peak))
    out["skipped_samples"] = float(skipped)
    return out


def environment_params() -> dict[str, str]:
    import importlib.metadata
    import subprocess

    params = {}
    for package in ("torch", "deepspeed", "transformers", "mosaicml-streaming", "mlflow"):
        try:
            params[f"version.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    params["git_sha"] = sha or "unknown"
    return params


def _progress(rank: int, total: int, start: int):
    """Rank 0's progress bar: step, loss, samples/s, ETA."""
    if rank != 0:
        return lambda *args: None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(step: int, loss: float | None, samples_per_s: float | None) -> None:
        bar.n = step
        postfix = {}
        if loss is not None:  # the last logged loss (tracking.log_every)
            postfix["loss"] = f"{loss:.3f}"
        if samples_per_s:
            postfix["samples/s"] = f"{samples_per_s:.1f}"
        bar.set_postfix(postfix, refresh=False)
        bar.refresh()
        if step >= total:
            bar.close()

    return update
