"""The DeepSpeed config of a job: its template from ds_configs/ plus the fields the job owns
(batch, precision, clipping), buffer sizes cut to the model, and the settings CPU ranks need.
`prepare_for_engine` is what the trainer (and the benchmarks and tests that mirror it) do to the
step module and config before `deepspeed.initialize`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from soho_scale.engine.patches import deepspeed_zero3
from soho_scale.model.precision import cast_to_precision
from soho_scale.spec import Job, accumulation_steps

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Communication buffers sized for BERT-base/ResNet-101 in the templates; DeepSpeed allocates them
# whole (ZeRO-3: 200M elements = 800 MB fp32 per rank), however small the model.
_BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")


def build_deepspeed_config(
    job: Job, world_size: int, num_params: int | None = None
) -> dict[str, Any]:
    """The DeepSpeed config: the job's template plus batch, precision and clipping from the job.

    With `num_params` (the model's parameter count), bucket sizes larger than the whole model
    are cut to it: the same single bucket, without the unused buffer."""
    config = job.deepspeed.read_template()
    zero = config.get("zero_optimization", {})
    if num_params:
        # DeepSpeed asserts an allgather bucket that is a multiple of its alignment (2): round up.
        size = -(-int(num_params) // 64) * 64
        for key in _BUCKET_KEYS:
            if isinstance(zero.get(key), int) and zero[key] > size:
                zero[key] = size
    config["train_micro_batch_size_per_gpu"] = job.batch.micro_batch_per_rank
    config["gradient_accumulation_steps"] = accumulation_steps(job, world_size)
    config["train_batch_size"] = job.batch.global_batch
    if job.optim.grad_clip is not None:
        config["gradient_clipping"] = job.optim.grad_clip
    config["bf16"] = {"enabled": job.precision == "bf16"}
    # loss_scale 0 = dynamic loss scaling, the usual fp16 recipe (apex O1 in the official code)
    config["fp16"] = {
        "enabled": job.precision == "fp16",
        "loss_scale": 0,
        "initial_scale_power": 16,
    }
    return config


def tune_for_cpu(ds_config: dict[str, Any]) -> dict[str, Any]:
    """ZeRO-1/2 settings for CPU ranks, where two GPU-template choices only add work.

    DeepSpeed's CPU accelerator has no streams, so the gradient reduction runs synchronously in
    the backward hooks whatever `overlap_comm` says; `overlap_comm` then only adds a second
    bucket-sized gradient buffer. `reduce_scatter` (with the default multi-rank bucket all-reduce)
    all-reduces a flattened copy of the gradient bucket and copies it back; without it the
    contiguous bucket is all-reduced in place. Changes `ds_config` in place and returns it.
    """
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") in (1, 2):
        zero["overlap_comm"] = False
        zero["reduce_scatter"] = False
    return ds_config


def prepare_for_engine(step_module: nn.Module, job: Job, world: int) -> tuple[dict, torch.dtype]:
    """Cast `step_module` to the job's precision and build its DeepSpeed config. Returns (config,
    dtype of the batches' floating tensors).

    The cast comes first because DeepSpeed's bf16/fp16 engine converts parameters only, and
    BatchNorm would then meet low-precision inputs with fp32 running statistics (the visual
    dictionary keeps itself fp32). The config's buckets are cut to the module's size; CPU ranks
    get `tune_for_cpu`; ZeRO-3 gets the optimizer without a second fp32 copy of fp32 weights
    (patches/deepspeed_zero3.py)."""
    dtype = DTYPES[job.precision]
    cast_to_precision(step_module, dtype)
    num_params = sum(p.numel() for p in step_module.parameters())
    config = build_deepspeed_config(job, world, num_params)
    if job.deepspeed.zero_stage == 3:
        deepspeed_zero3.install()
    return (config if torch.cuda.is_available() else tune_for_cpu(config)), dtype
