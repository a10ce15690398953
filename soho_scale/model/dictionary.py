"""Visual dictionary (VD): K learned "visual words" that quantise grid features.

The dictionary is buffers, not parameters: it is updated by a moving average of the features
assigned to each entry, never by gradients. Statistics are summed over all data-parallel ranks
before the update, so every rank holds the same dictionary (a rank that saw half the data and a
single process that saw all of it end up identical). Buffers and their arithmetic stay fp32 even
when the rest of the model is cast to bf16/fp16 (`keeps_float32_state`, honoured by
`soho_scale.model.precision.cast_to_precision`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def vd_decay(step: int | torch.Tensor, decay: float, start: float, warmup_steps: int) -> float:
    """EMA decay at update `step`: linear ramp from `start` to `decay` over `warmup_steps`."""
    step = int(step)
    if warmup_steps <= 0 or step >= warmup_steps:
        return decay
    return start + (decay - start) * step / warmup_steps


class VisualDictionary(nn.Module):
    """forward(features (N, D)) -> (quantized (N, D) with straight-through gradient, indices (N,))."""

    keeps_float32_state = True  # bf16 would round the moving averages' small updates away

    def __init__(
        self,
        size: int,
        dim: int,
        decay: float = 0.99,
        decay_start: float = 0.4,
        decay_warmup_steps: int = 1000,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.size = size
        self.decay = decay
        self.decay_start = decay_start
        self.decay_warmup_steps = decay_warmup_steps
        self.eps = eps
        embed = torch.randn(size, dim)
        self.register_buffer("embed", embed)  # (K, D) the visual words
        self.register_buffer("embed_sum", embed.clone())  # (K, D) EMA of assigned feature sums
        self.register_buffer("cluster_size", torch.zeros(size))  # (K,) EMA of assignment counts
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """Index of the nearest entry (L2) for each row of `features` (N, D)."""
        x = features.detach().float()
        distances = (
            x.pow(2).sum(1, keepdim=True) - 2 * x @ self.embed.t() + self.embed.pow(2).sum(1)[None]
        )  # (N, K)
        return distances.argmin(dim=1)

    @torch.no_grad()
    def update(
        self, features: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor | None = None
    ) -> None:
        """One EMA step with this rank's `features` (N, D) assigned to `indices` (N,); rows of
        `weight` (N,) 0 take no part (the cells of an image that did not decode)."""
        x = features.detach().float()
        onehot = torch.zeros(x.shape[0], self.size, device=x.device, dtype=torch.float32)
        if weight is None:
            onehot.scatter_(1, indices[:, None], 1.0)
        else:
            onehot.scatter_(1, indices[:, None], weight.to(onehot.dtype)[:, None])
        counts = onehot.sum(0)  # (K,)
        sums = onehot.t() @ x  # (K, D)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        decay = vd_decay(self.num_updates, self.decay, self.decay_start, self.decay_warmup_steps)
        # A step in which no rank saw a decoded image leaves the dictionary as it is (before any
        # update its averages are 0, and the division below would make the words inf).
        seen = counts.sum() > 0
        decay = torch.where(seen, decay, 1.0)
        self.cluster_size.mul_(decay).add_(counts * (1 - decay))
        self.embed_sum.mul_(decay).add_(sums * (1 - decay))
        # Laplace smoothing keeps never-used entries from dividing by zero.
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.size * self.eps) * total
        self.embed.copy_(torch.where(seen, self.embed_sum / smoothed[:, None], self.embed))
        self.num_updates.add_(seen.long())

    def forward(
        self, features: torch.Tensor, update_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=features.device.type, enabled=False):
            indices = self.assign(features)
            words = self.embed[indices]  # (N, D) fp32
            if self.training:
                self.update(features, indices, update_weight)
        # Straight-through: the forward value is the visual word, the gradient flows to features.
        quantized = features + (words.to(features.dtype) - features).detach()
        return quantized, indices
