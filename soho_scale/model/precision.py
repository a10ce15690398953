"""A model at its training precision: every floating-point parameter and buffer cast to the
job's dtype, except the state of modules that say `keeps_float32_state = True` (the visual
dictionary: its moving averages would lose their small updates in bf16)."""

from __future__ import annotations

import torch
from torch import nn


def cast_to_precision(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast `module` in place, as `module.to(dtype)` would, leaving fp32-state modules alone."""
    kept = {
        id(inner)
        for outer in module.modules()
        if getattr(outer, "keeps_float32_state", False)
        for inner in outer.modules()
    }
    with torch.no_grad():
        for sub in module.modules():
            if id(sub) in kept:
                continue
            for param in sub.parameters(recurse=False):
                if param.is_floating_point():
                    param.data = param.data.to(dtype)
            for name, buffer in sub.named_buffers(recurse=False):
                if buffer is not None and buffer.is_floating_point():
                    setattr(sub, name, buffer.to(dtype))
    return module
