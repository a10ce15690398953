"""ZeRO-3 in fp32 without a second fp32 copy of every weight partition.

DeepSpeed's stage-3 optimizer keeps an fp32 master copy of each rank's weight partition. When
the partition already is fp32 on the optimizer's device (its torch-autocast path) it uses the
partition itself, but the check compares `tensor.device`, a `torch.device`, with `self.device`,
the accelerator's device *name*, a str ('cpu', 'cuda:0'). The two never compare equal, so every
fp32 job holds its weights twice (deepspeed 0.19.8, `stage3.py` `_create_fp32_partitions`;
measured with benchmarks/engine_overhead.py: ZeRO-3 model state 0.625x of ZeRO-0 instead of
0.50x on 2 ranks). The subclass makes the same comparison with a `torch.device`. bf16/fp16
partitions (a different dtype) and CPU-offloaded optimizers (their own branch) are unaffected.
"""

from __future__ import annotations

import torch
from deepspeed.runtime.zero import stage3


class Stage3WithoutFp32Copy(stage3.DeepSpeedZeroOptimizer_Stage3):
    def _create_fp32_partitions(self) -> None:
        name = self.device
        if not self.offload_optimizer:
            self.device = torch.device(name)
        try:
            super()._create_fp32_partitions()
        finally:
            self.device = name


def install() -> None:
    """Make `deepspeed.initialize` build stage-3 optimizers as `Stage3WithoutFp32Copy` (the engine
    imports the class from `deepspeed.runtime.zero.stage3` when it builds one)."""
    stage3.DeepSpeedZeroOptimizer_Stage3 = Stage3WithoutFp32Copy
