"""Throughput, data-wait and MFU, computed per batch from the real image sizes.

FLOPs: forward = 2 x MACs; a training step ~ 3 x forward. The CNN's cost is measured once by
counting the backbone's FLOPs on a 64x64 input (torch's FlopCounterMode on the meta device) and
scaled by each image's padded area; the transformer's cost is 2 x (non-embedding params) per
token plus attention (4 x L^2 x D per layer) and the MLM projection at masked positions only.
"""

from __future__ import annotations

import math
import resource
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from soho_scale.model.config import SohoConfig

# Dense (no sparsity) peak FLOP/s of one device by the job's precision, from the vendors' data
# sheets; a name is matched as a substring of torch's device name, first match wins.
KNOWN_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
}


def peak_flops(precision: str, given: float | None = None) -> float | None:
    """FLOP/s MFU is measured against: `given` (the spec's `resources.peak_flops`), else the
    known peak of this rank's GPU at `precision`; None on CPU or an unknown GPU (no MFU)."""
    if given:
        return given
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in KNOWN_PEAK_FLOPS.items():
        if key in name:
            return peaks.get(precision)
    return None


def cnn_flops_per_pixel(config: SohoConfig) -> float:
    from soho_scale.model.vision import VisionEncoder

    with torch.device("meta"):
        encoder = VisionEncoder(config).eval()
        images = torch.empty(1, 3, 64, 64)
    with FlopCounterMode(display=False) as counter:
        encoder(images)
    return counter.get_total_flops() / (64 * 64)


class FlopModel:
    """Forward FLOPs of one pre-training batch."""

    def __init__(self, config: SohoConfig):
        self.pool = config.pool
        self.per_pixel = cnn_flops_per_pixel(config)
        d, layers = config.hidden_size, config.num_layers
        per_layer = 4 * d * d + 2 * d * config.intermediate_size  # attention + FFN weights
        self.per_token = 2 * per_layer * layers
        self.attention = 4 * layers * d
        self.mlm = 2 * config.vocab_size * d

    def forward_flops(self, batch: dict[str, torch.Tensor], mlm_positions: int = 0) -> float:
        images = batch["images"]
        cnn = self.per_pixel * images.shape[0] * images.shape[2] * images.shape[3]
        # Visual tokens per text: the padded grid (what attention really computes on).
        rows = math.ceil(math.ceil(images.shape[2] / 32) / self.pool)
        cols = math.ceil(math.ceil(images.shape[3] / 32) / self.pool)
        grid = rows * cols
        texts, length = batch["text_ids"].shape
        sequence = length + grid
        transformer = texts * (self.per_token * sequence + self.attention * sequence**2)
        return cnn + transformer + self.mlm * mlm_positions


class MetricMeans:
    """The logged step metrics: means over every micro-batch since the last log (gradient
    accumulation included) and over all ranks, not rank 0's last micro-batch. NaN values (an
    accuracy with nothing to score) are left out of their mean. Adding stays on the device
    (no sync per micro-batch); `mean_over_ranks` is one all-reduce, on every rank at once."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            value = torch.as_tensor(value).detach().float().to(self.device).reshape(())
            present = ~torch.isnan(value)
            self.sums[key] = self.sums.get(key, 0.0) + torch.where(present, value, 0.0)
            self.counts[key] = self.counts.get(key, 0.0) + present.float()

    def mean_over_ranks(self, totals: dict[str, float] | None = None) -> dict[str, float]:
        """The means, plus each of `totals` (this rank's counts, e.g. replaced samples) summed
        over the ranks, in the same all-reduce: each rank counts its own, rank 0 logs."""
        keys = sorted(self.sums)
        totals = totals or {}
        if not keys and not totals:
            return {}
        packed = torch.stack(
            [self.sums[k] for k in keys]
            + [self.counts[k] for k in keys]
            + [torch.tensor(float(v), device=self.device) for v in totals.values()]
        )
        if dist.is_initialized():
            dist.all_reduce(packed)
        values = packed.tolist()
        self.reset()
        n = len(keys)
        means = {k: values[i] / values[n + i] for i, k in enumerate(keys) if values[n + i] > 0}
        return {**means, **dict(zip(totals, values[2 * n :]))}


class Throughput:
    """Accumulates per-step numbers between two logging points."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.samples = 0
        self.tokens = 0
        self.flops = 0.0

    def add(self, samples: int, tokens: int, flops: float, data_wait: float) -> None:
        self.samples += samples
        self.tokens += tokens
        self.flops += flops
        self.data_wait += data_wait

    def summary(self, world_size: int, peak_flops: float | None) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {
            "samples_per_s": self.samples * world_size / elapsed,
            "tokens_per_s": self.tokens * world_size / elapsed,
            "data_wait_fraction": self.data_wait / elapsed,
            "peak_memory_gb": peak_memory_gb(),
        }
        if peak_flops:
            out["mfu"] = 3 * self.flops / elapsed / peak_flops  # per rank: own FLOPs / own peak
        return out


def peak_memory_gb() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
