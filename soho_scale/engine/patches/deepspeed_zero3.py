"""Speed (memory) patch of DeepSpeed: ZeRO-3 in fp32 without a second fp32 copy of every weight
partition.

DeepSpeed's stage-3 optimizer keeps an fp32 master copy of each rank's weight partition. When the
partition already is fp32 on the optimizer's device it means to use the partition itself, but
`_create_fp32_partitions` compares `tensor.device` (a `torch.device`) with `self.device` (the
accelerator's device *name*, a str such as 'cpu' or 'cuda:0'); the two never compare equal, so
every fp32 job holds its weights twice. `Stage3WithoutFp32Copy` makes the same comparison with a
`torch.device`. bf16/fp16 partitions (another dtype) and CPU-offloaded optimizers (their own
branch) are unaffected. `install()` makes `deepspeed.initialize` build stage-3 optimizers as this
class (the engine imports the class from `deepspeed.runtime.zero.stage3` when it builds one), for
the rest of the process. Delete it when DeepSpeed compares devices itself
(tests/engine/patches/test_deepspeed_zero3.py says when).
"""

from __future__ import annotations

from data_pipeline.patches.guard import Patch

PATCH = Patch(
    module=__name__,
    library="deepspeed",
    tested=">=0.19.8,<0.20",
    kind="speed",
    relies_on={
        "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions": "cc085bafc94be1df",
        "deepspeed.runtime.engine:DeepSpeedEngine._configure_zero_optimizer": "9fa1c33941b1b59b",
    },
    what="ZeRO-3 uses an fp32 weight partition as its own master copy instead of cloning it",
    buys="fp32 ZeRO-3 jobs (CPU demo/CI; fp32 on GPUs): model state per rank 0.50x of ZeRO-0 on "
    "2 ranks where DeepSpeed alone holds 0.625x (benchmarks/README.md, engine_overhead); nothing "
    "for bf16/fp16 jobs",
)


def supported() -> bool:
    return PATCH.supported()


def install() -> bool:
    if not PATCH.install():
        return False
    import torch
    from deepspeed.runtime.zero import stage3

    if not issubclass(stage3.DeepSpeedZeroOptimizer_Stage3, _Marker):

        class Stage3WithoutFp32Copy(stage3.DeepSpeedZeroOptimizer_Stage3, _Marker):
            def _create_fp32_partitions(self) -> None:
                name = self.device
                if not self.offload_optimizer:
                    self.device = torch.device(name)
                try:
                    super()._create_fp32_partitions()
                finally:
                    self.device = name

        stage3.DeepSpeedZeroOptimizer_Stage3 = Stage3WithoutFp32Copy
    return True


class _Marker:
    """Tells an installed optimizer class from DeepSpeed's own (install() runs once)."""
