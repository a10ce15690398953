"""`soho-scale plan`: what a job will cost and whether the machines are ready for it.

The numbers (world size, batch and accumulation, steps, FLOPs per step, time at a given MFU,
checkpoint size) come from the spec, the shard indexes and `FlopModel`; the pre-flight checks
(soho_scale/preflight.py: storage, checkpoint location, MLflow, /dev/shm, stale shared memory,
GPUs) each end in PASS or FAIL with the fix. Any FAIL makes the command exit 1, so `plan` can
gate a submission.
Nothing here starts a rank, downloads a shard or reads a credential's value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from dataclasses import asdict
from typing import Any

from data_pipeline.urls import is_s3_url, split_s3_url
from soho_scale.engine.tracking import METRICS_FILE
from soho_scale.preflight import (
    Check,
    check_buckets,
    check_checkpoint_location,
    check_cnn_init,
    check_gpus,
    check_init_from,
    check_mlflow,
    check_shm,
    check_stale_shm,
    check_stream,
    clean_stale_shm,
    format_bytes,
)
from soho_scale.secrets import redact
from soho_scale.spec import Job, SpecError, accumulation_steps, derived, load_job

DEFAULT_PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16
# What the project measured (r101-l12, 600x1000, bf16, one H200: 8.6-11.3%, benchmarks/README.md)
MEASURED_MFU = 0.10


def planned_mfu(job: Job, given: float | None, runs_root: str = "runs") -> tuple[float, str]:
    """(MFU, where it comes from): --mfu, else the median MFU this job's last run logged
    (`<runs_root>/<name>/metrics.jsonl`), else the project's own measurement."""
    if given is not None:
        return given, "--mfu"
    path = os.path.join(runs_root, job.name, METRICS_FILE)
    measured = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    value = json.loads(line).get("metrics", {}).get("mfu")
                except ValueError:
                    continue
                if isinstance(value, int | float) and value > 0:
                    measured.append(float(value))
    if measured:
        return statistics.median(measured), f"measured: median of {len(measured)} in {path}"
    return MEASURED_MFU, "default: the project's measurement on one H200 (benchmarks/README.md)"


def world_shape(job: Job, nodes: int | None, gpus_per_node: int | None) -> tuple[int, int]:
    """(nodes, ranks per node): the flags when given, else the spec's resources."""
    return nodes or job.resources.nodes, gpus_per_node or job.resources.procs_per_node


def image_shape(job: Job) -> tuple[int, int]:
    """(height, width) of a representative image: the largest the transform produces."""
    size = job.data.image
    return (size.max_size, size.max_size) if size.square else (size.min_size, size.max_size)


def images_per_sample(job: Job) -> int:
    return 2 if job.data.task == "nlvr2" else 1


def texts_per_image(job: Job) -> int:
    return job.data.captions_per_image if job.data.task == "pretrain" else 1


def shm_estimate(job: Job, ranks_per_node: int, num_samples: int | None) -> int:
    """Bytes of /dev/shm a node needs: batches in flight between DataLoader workers and ranks
    (float32 images, prefetched), plus streaming's shared sample ids and shard states."""
    from data_pipeline.settings import PREFETCH_FACTOR  # the loader's own setting

    height, width = image_shape(job)
    batch = job.batch.micro_batch_per_rank * images_per_sample(job) * 3 * height * width * 4
    in_flight = batch * job.data.workers * PREFETCH_FACTOR if job.data.workers else 0
    streaming = 16 * (num_samples or 0) + 2**20
    return ranks_per_node * (in_flight + streaming)


# ---- numbers -------------------------------------------------------------------------------


def step_flops(job: Job) -> dict[str, float]:
    """Training FLOPs of one optimizer step on representative images (3 x forward)."""
    import torch

    from soho_scale.engine.telemetry import FlopModel
    from soho_scale.model.soho import visual_tokens_for

    config = job.model.config()
    height, width = image_shape(job)
    images = job.batch.global_batch * images_per_sample(job)
    texts = job.batch.global_batch * texts_per_image(job)
    length = job.data.text.max_len
    batch = {  # shapes only: FlopModel reads sizes, the meta device allocates nothing
        "images": torch.empty(images, 3, height, width, device="meta"),
        "text_ids": torch.empty(texts, length, dtype=torch.long, device="meta"),
    }
    masked = 0
    if job.data.task == "pretrain":  # MLM head only at masked text positions
        masked = round(texts * (length - 2) * job.objectives.mlm_probability)
    forward = FlopModel(config).forward_flops(batch, masked)
    return {
        "image_size": [height, width],
        "visual_tokens_per_image": visual_tokens_for(config, height, width),
        "texts_per_step": texts,
        "forward_flops_per_step": forward,
        "train_flops_per_step": 3 * forward,
        "train_flops_per_sample": 3 * forward / job.batch.global_batch,
    }


def checkpoint_size(job: Job, world_size: int) -> dict[str, Any]:
    """Bytes of one checkpoint: fp32 weights, optimizer moments (AdamW 2, SGD momentum 1), and
    the bf16/fp16 module copy in mixed precision; per rank after ZeRO partitioning."""
    import torch

    from soho_scale.engine.optimizer import is_cnn_parameter
    from soho_scale.model.soho import SohoPretrain

    # Counting needs no weights: skip the BERT initialisation (a hub id may be offline).
    config = dataclasses.replace(job.model.config(), init_from=None)
    with torch.device("meta"):
        model = SohoPretrain(config)
    unique = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    params = sum(p.numel() for _, p in unique)
    sgd = sum(p.numel() for n, p in unique if p.requires_grad and is_cnn_parameter(n))
    adamw = sum(p.numel() for n, p in unique if p.requires_grad and not is_cnn_parameter(n))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    master = 4 * (sgd + adamw)  # fp32 weights the optimizer steps on
    moments = 4 * sgd + 8 * adamw
    module = params * (2 if job.precision in ("bf16", "fp16") else 4) + buffers
    stage = job.deepspeed.zero_stage
    optimizer_per_rank = (master + moments) / (world_size if stage >= 1 else 1)
    module_per_rank = module / (world_size if stage == 3 else 1)
    return {
        "model": "pre-training model"
        + ("" if job.data.task == "pretrain" else " (task head not counted)"),
        "params": params,
        "trainable_sgd": sgd,
        "trainable_adamw": adamw,
        "bytes_total": module + master + moments,
        "bytes_per_rank_max": int(module_per_rank + optimizer_per_rank),
        "zero_stage": stage,
    }


def make_plan(
    job: Job,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    peak_tflops: float | None = None,
    mfu: float | None = None,
    timeout_s: float = 5.0,
    shm_dir: str = "/dev/shm",
) -> dict[str, Any]:
    """Numbers and pre-flight checks of a job; `ok` is False when any check failed."""
    from data_pipeline.storage import s3_client

    nodes, per_node = world_shape(job, nodes, gpus_per_node)
    world = nodes * per_node
    accumulation_steps(job, world)  # SpecError (exit 2) when the global batch does not divide
    checks: list[Check] = []

    train_urls = [s.remote for s in job.data.streams]
    eval_urls = [s.remote for s in job.eval.streams]
    # init_from replaces every weight, the CNN's too
    cnn_init = None if job.model.init_from else job.model.config().cnn_init
    s3_urls = [
        u for u in [*train_urls, *eval_urls, job.checkpoint.dir, cnn_init or ""] if is_s3_url(u)
    ]
    client = s3_client(timeout_s=timeout_s, max_attempts=1) if s3_urls else None
    good_buckets: set[str] = set()
    if s3_urls:
        bucket_checks, good_buckets = check_buckets(s3_urls, client)
        checks += bucket_checks
    counts: dict[str, int | None] = {}
    for url in dict.fromkeys([*train_urls, *eval_urls]):
        if is_s3_url(url) and split_s3_url(url)[0] not in good_buckets:
            counts[url] = None  # its bucket check already failed, with the fix
            continue
        check, counts[url] = check_stream(url, client, job.data.task)
        checks.append(check)
    known = all(counts[u] is not None for u in train_urls)
    num_samples = sum(counts[u] or 0 for u in train_urls) if known else None

    try:  # an epoch: `data.epoch_size` samples drawn by proportion, else every sample once
        numbers = derived(job, job.data.epoch_size or num_samples, world)
    except SpecError as e:
        checks.append(Check("data size", False, str(e), "lower batch.global_batch or add data"))
        numbers = derived(job, None, world)
    numbers["nodes"], numbers["ranks_per_node"] = nodes, per_node

    if job.model.init_from:
        checks.append(check_init_from(job.model.init_from))
    else:
        checks.append(check_cnn_init(cnn_init, client))
    checks.append(check_checkpoint_location(job.checkpoint.dir, client))
    checks.append(check_mlflow(timeout_s))
    checks.append(check_shm(shm_estimate(job, per_node, num_samples), shm_dir))
    checks.append(check_stale_shm(shm_dir))
    checks.append(check_gpus(per_node))

    flops = step_flops(job)
    if peak_tflops is None:  # the spec's peak, else an H100/H200's
        spec_peak = job.resources.peak_flops
        peak_tflops = spec_peak / 1e12 if spec_peak else DEFAULT_PEAK_TFLOPS
    mfu, mfu_source = planned_mfu(job, mfu)
    timing: dict[str, Any] = {"peak_tflops_per_rank": peak_tflops, "mfu": mfu}
    timing["mfu_source"] = mfu_source
    if peak_tflops > 0:
        seconds_per_step = flops["train_flops_per_step"] / (world * peak_tflops * 1e12 * mfu)
        timing.update(
            seconds_per_step=seconds_per_step,
            samples_per_s_per_rank=job.batch.global_batch / seconds_per_step / world,
        )
        if numbers["total_steps"]:
            timing.update(
                total_hours=seconds_per_step * numbers["total_steps"] / 3600,
                rank_hours=seconds_per_step * numbers["total_steps"] * world / 3600,
            )
    return {
        "job": job.name,
        "task": job.data.task,
        "preset": job.model.preset,
        "precision": job.precision,
        "zero_stage": job.deepspeed.zero_stage,
        "overrides": job.overrides,
        "stream_samples": counts,
        "derived": numbers,
        "flops": flops,
        "time": timing,
        "checkpoint": checkpoint_size(job, world),
        "checks": [asdict(c) for c in checks],
        "ok": all(c.ok for c in checks),
    }


def _hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.1f} s"
    return f"{h * 60:.1f} min" if h < 1 else f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} days"


def format_plan(plan: dict[str, Any]) -> str:
    d, f, t, c = plan["derived"], plan["flops"], plan["time"], plan["checkpoint"]
    overrides = " ".join(plan["overrides"]) or "none"
    lines = [
        f"job {plan['job']}: {plan['task']}, preset {plan['preset']}, {plan['precision']}, "
        f"ZeRO-{plan['zero_stage']} (overrides: {overrides})",
        f"world: {d['nodes']} node(s) x {d['ranks_per_node']} ranks = {d['world_size']}",
        f"batch: global {d['global_batch']} = {d['micro_batch_per_rank']} per rank x "
        f"{d['world_size']} ranks x accumulation {d['accumulation_steps']}",
    ]
    for url, samples in plan["stream_samples"].items():
        lines.append(f"stream {url}: {'unknown' if samples is None else samples} samples")
    lines.append(
        f"steps: {d['steps_per_epoch'] or 'unknown'} per epoch, {d['total_steps'] or 'unknown'} "
        f"in total (warm-up {d['warmup_steps']})"
    )
    lines.append(
        f"FLOPs: {f['train_flops_per_step'] / 1e12:.3g} TFLOP per training step "
        f"({f['train_flops_per_sample'] / 1e12:.3g} per sample; images {f['image_size'][0]}x"
        f"{f['image_size'][1]}, {f['visual_tokens_per_image']} visual tokens, "
        f"{f['texts_per_step']} texts per step)"
    )
    if "seconds_per_step" in t:
        total = "unknown (step count unknown)"
        if "total_hours" in t:
            total = f"{_hours(t['total_hours'])} ({_hours(t['rank_hours'])} rank-hours)"
        lines.append(
            f"time: {total}, {t['seconds_per_step']:.3g} s/step, "
            f"{t['samples_per_s_per_rank']:.1f} samples/s per rank at {t['mfu']:.1%} MFU "
            f"({t['mfu_source']}) of {t['peak_tflops_per_rank']:g} TFLOP/s per rank"
        )
    else:
        lines.append("time: not estimated (--peak-tflops 0)")
    lines.append(
        f"checkpoint: {format_bytes(c['bytes_total'])} ({c['params'] / 1e6:.1f}M params, {c['model']}), "
        f"at most {format_bytes(c['bytes_per_rank_max'])} written per rank"
    )
    lines.append("pre-flight:")
    for check in plan["checks"]:
        lines.append(f"  {'PASS' if check['ok'] else 'FAIL'}  {check['name']}: {check['detail']}")
        if not check["ok"] and check["fix"]:
            lines.append(f"        fix: {check['fix']}")
    failed = sum(not c["ok"] for c in plan["checks"])
    lines.append("ready" if not failed else f"{failed} check(s) failed")
    return "\n".join(lines)


def plan_main(argv: list[str]) -> int:
    """`soho-scale plan JOB [K=V ...]`: exit 0 when every check passes, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="soho-scale plan",
        description="Cost of a job (steps, FLOPs, time, checkpoint size) and pre-flight checks.",
    )
    parser.add_argument("job", nargs="?", help="job YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--nodes", type=int, help="default: resources.nodes")
    parser.add_argument("--gpus-per-node", type=int, help="default: resources.procs_per_node")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak per rank (default: resources.peak_flops, else 989: H100/H200 dense bf16; "
        "0 skips the time estimate)",
    )
    parser.add_argument(
        "--mfu",
        type=float,
        default=None,
        help=f"default: this job's last run's measured MFU, else {MEASURED_MFU} (measured)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per network check")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument(
        "--clean-shm", action="store_true", help="remove stale streaming/DeepSpeed shared memory"
    )
    parser.add_argument("--shm-dir", default="/dev/shm", help="where shared memory lives")
    args = parser.parse_intermixed_args(argv)
    if args.clean_shm:
        removed = clean_stale_shm(args.shm_dir)
        print(f"removed {len(removed)} stale shared-memory file(s)")
        for path in removed:
            print(f"  {path}")
        if not args.job:
            return 0
    if not args.job:
        print("soho-scale plan: give a job file (or --clean-shm)", file=sys.stderr)
        return 2
    peak = args.peak_tflops
    if (args.mfu is not None and not 0 < args.mfu <= 1) or (peak is not None and not peak >= 0):
        print("soho-scale plan: --mfu must be in (0, 1] and --peak-tflops >= 0", file=sys.stderr)
        return 2  # (`not x >= 0` also refuses nan)
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value is not None and value < 1:
            print(f"soho-scale plan: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if not args.timeout > 0:
        print(f"soho-scale plan: --timeout must be > 0, got {args.timeout}", file=sys.stderr)
        return 2
    job = load_job(args.job, args.overrides)
    plan = make_plan(
        job, args.nodes, args.gpus_per_node, args.peak_tflops, args.mfu, args.timeout, args.shm_dir
    )
    # URLs (streams, checkpoint.dir, endpoints in a check's detail) are shown without credentials
    print(redact(json.dumps(plan, indent=2) if args.json else format_plan(plan)))
    return 0 if plan["ok"] else 1
