"""Engine overhead: soho_scale's DeepSpeed path (ZeRO 0-3) vs a plain PyTorch DDP loop, side by
side in one run on 2 CPU ranks (gloo); prints one JSON object.

Every variant trains the same tiny model (`SohoPretrain(build_config("tiny"))`, same init) on the
same in-memory generated batch with the same objective. The engine variants are the trainer's own
pieces: `PretrainStep`, `build_optimizer` (one optimizer, SGD + AdamW groups),
the DeepSpeed config of jobs/demo/pretrain.yaml (fp32, stage overridden) as the trainer builds it
for CPU ranks (`prepare_for_engine`) and `deepspeed.initialize`; the loop is engine(batch) /
engine.backward / engine.step. The baseline is what a user would write: DistributedDataParallel
+ torch.optim.SGD/AdamW + clip_grad_norm_.
"ddp_sgdadamw" is DDP with the trainer's optimizer, to tell optimizer cost from engine cost.

Variants run interleaved (rounds, rotating order) because the machine is shared and noisy; each
variant's step time is the median over rounds of the round's mean step time (warm-up excluded).
Model-state memory per rank is counted from the tensors each rank really holds (parameters or
their ZeRO-3 partitions, gradients or gradient partitions, fp32 master partitions, optimizer
state), measured right after backward, when all of them are alive.

    .venv/bin/python benchmarks/engine_overhead.py --steps 4 --rounds 5 --batch 4
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from data_pipeline.collate import pad_images

REPO = Path(__file__).resolve().parent.parent
DEMO_JOB = REPO / "jobs" / "demo" / "pretrain.yaml"
ALL_VARIANTS = ("ddp", "ddp_sgdadamw", "zero0", "zero1", "zero2", "zero3")
TARGETS = {"zero1_vs_ddp": 1.05, "zero2_vs_ddp": 1.10, "zero3_state_vs_zero0": 0.6}


def generated_batch(
    images: int, height: int, width: int, captions: int, length: int, seed: int
) -> dict[str, torch.Tensor]:
    """A pre-training batch in the documented format, padded by collate's `pad_images`; real
    sizes vary up to `height` x `width`."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.stack(
        [
            torch.randint(height * 2 // 3, height + 1, (images,), generator=g),
            torch.randint(width * 2 // 3, width + 1, (images,), generator=g),
        ],
        dim=1,
    )
    sizes[0] = torch.tensor([height, width])  # the largest image
    pixels, sizes = pad_images(
        [
            torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
            for h, w in sizes.tolist()
        ]
    )
    count = images * captions
    text_ids = torch.randint(1000, 3000, (count, length), generator=g)
    text_ids[:, 0], text_ids[:, -1] = 101, 102
    masked = torch.rand(count, length, generator=g) < 0.15
    masked[:, 0] = masked[:, -1] = False
    masked[:, 1] = True  # at least one MLM target per caption
    mlm_labels = torch.where(masked, text_ids, torch.full_like(text_ids, -100))
    return {
        "images": pixels,
        "image_sizes": sizes,
        "text_ids": text_ids.masked_fill(masked, 103),
        "text_mask": torch.ones_like(text_ids),
        "text_image_index": torch.arange(count) // captions,
        "mlm_labels": mlm_labels,
        "sample_ids": torch.arange(images),
        "sample_valid": torch.ones(images, dtype=torch.bool),  # as the loader gives it
    }


class Ledger:
    """Bytes of distinct storages by category (a view into a flat buffer counts the buffer once)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}

    def add(self, category: str, tensor: Any) -> None:
        self.bytes.setdefault(category, 0)
        if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.seen:
            return
        self.seen.add(storage.data_ptr())
        self.bytes[category] += storage.nbytes()

    def walk(self, category: str, value: Any, depth: int = 0) -> None:
        """Every tensor reachable through containers and DeepSpeed objects (comm buckets...)."""
        if depth > 4:
            return
        if isinstance(value, torch.Tensor):
            self.add(category, value)
        elif isinstance(value, dict):
            for item in list(value.values()):
                self.walk(category, item, depth + 1)
        elif isinstance(value, (list, tuple)):
            for item in value:
                self.walk(category, item, depth + 1)
        elif type(value).__module__.startswith("deepspeed") and hasattr(value, "__dict__"):
            for item in list(vars(value).values()):
                self.walk(category, item, depth + 1)


class Variant:
    """One training set-up; `forward_backward` and `optimizer_step` make one step."""

    name: str
    module: torch.nn.Module

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def optimizer_step(self) -> None:
        raise NotImplementedError

    def model_state(self) -> dict[str, int]:
        raise NotImplementedError


class DdpVariant(Variant):
    def __init__(self, name: str, step_module: torch.nn.Module, optim: Any, clip: float) -> None:
        from torch.nn.parallel import DistributedDataParallel

        from soho_scale.engine.optimizer import build_optimizer, is_cnn_parameter

        self.name, self.clip = name, clip
        # broadcast_buffers=False: the visual dictionary all-reduces its own statistics, and the
        # engine path does not re-broadcast buffers either; keeps the comparison like for like.
        self.ddp = DistributedDataParallel(step_module, broadcast_buffers=False)
        self.module = step_module
        self.params = [p for p in step_module.parameters() if p.requires_grad]
        if name == "ddp_sgdadamw":
            self.optimizers = [build_optimizer(step_module, optim)]
        else:
            cnn = [p for n, p in step_module.named_parameters() if is_cnn_parameter(n)]
            rest = [p for n, p in step_module.named_parameters() if not is_cnn_parameter(n)]
            self.optimizers = [
                torch.optim.SGD(
                    cnn, lr=optim.cnn.lr, momentum=optim.cnn.momentum,
                    weight_decay=optim.cnn.weight_decay,
                ),
                torch.optim.AdamW(
                    rest, lr=optim.rest.lr, betas=tuple(optim.rest.betas), eps=optim.rest.eps,
                    weight_decay=optim.rest.weight_decay,
                ),
            ]  # fmt: skip

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss, _ = self.ddp(batch)
        loss.backward()

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        for optimizer in self.optimizers:
            optimizer.step()

    def model_state(self) -> dict[str, int]:
        ledger = Ledger()
        for p in self.params:
            ledger.add("params", p)
        for p in self.params:
            ledger.add("grads", p.grad)
        for optimizer in self.optimizers:
            for state in optimizer.state.values():
                for value in state.values():
                    ledger.add("optimizer_state", value)
        return ledger.bytes


class EngineVariant(Variant):
    def __init__(self, name: str, step_module: torch.nn.Module, job: Any, world: int) -> None:
        import deepspeed

        from soho_scale.engine.deepspeed_config import prepare_for_engine
        from soho_scale.engine.optimizer import build_optimizer

        self.name = name
        config, _ = prepare_for_engine(step_module, job, world)  # as the trainer does
        optimizer = build_optimizer(step_module, job.optim)
        self.engine, _, _, _ = deepspeed.initialize(
            model=step_module, optimizer=optimizer, config=config
        )
        self.module = step_module

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> None:
        loss, _ = self.engine(batch)
        self.engine.backward(loss)

    def optimizer_step(self) -> None:
        self.engine.step()

    def model_state(self) -> dict[str, int]:
        from soho_scale.engine.optimizer import SgdAdamW

        ledger = Ledger()
        zero = self.engine.optimizer
        base = zero
        while not isinstance(base, SgdAdamW) and hasattr(base, "optimizer"):
            base = base.optimizer
        params = list(self.module.parameters())
        for p in params:  # ZeRO-3 keeps only this rank's partition (ds_tensor); p.data is empty
            ledger.add("params", getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p)
        for p in params:
            ledger.add("grads", p.grad)
        if zero is not base:
            for name in ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer"):
                ledger.walk("grads", getattr(zero, name, None))
            masters = getattr(zero, "single_partition_of_fp32_groups", None)
            masters = masters or getattr(zero, "fp32_partitioned_groups_flat", [])
            for master in masters:
                ledger.add("grads", master.grad)
            for master in masters:
                ledger.add("master_weights", master)
        for state in base.state.values():
            for value in state.values():
                ledger.add("optimizer_state", value)
        # Everything else the ZeRO optimizer holds (gradient buckets...): not model state.
        ledger.walk("other_buffers", vars(zero) if zero is not base else {})
        return ledger.bytes


def build_variant(name: str, world: int, args: argparse.Namespace) -> Variant:
    from soho_scale.engine.step import build_step
    from soho_scale.engine.trainer import seed_everything
    from soho_scale.spec import load_job

    stage = name[len("zero") :] if name.startswith("zero") else "2"
    job = load_job(
        DEMO_JOB,
        [
            f"deepspeed.zero_stage={stage}",
            "precision=fp32",
            f"batch.micro_batch_per_rank={args.batch}",
            f"batch.global_batch={args.batch * world}",  # one micro-batch per optimizer step
            f"resources.procs_per_node={world}",
        ],
    )
    seed_everything(job.seed)  # the same initial weights in every variant and on every rank
    step_module = build_step(job)
    if name.startswith("ddp"):
        return DdpVariant(name, step_module, job.optim, job.optim.grad_clip)
    return EngineVariant(name, step_module, job, world)


def timed_step(variant: Variant, batch: dict, seed: int, phases: dict[str, list[float]]) -> None:
    # Same seed per step in every variant: the same ITM pairs, MVM masks and dropout.
    torch.manual_seed(seed)
    start = time.perf_counter()
    variant.forward_backward(batch)
    middle = time.perf_counter()
    variant.optimizer_step()
    end = time.perf_counter()
    phases["forward_backward"].append(middle - start)
    phases["optimizer_step"].append(end - middle)


def run_rank(rank: int, world: int, args: argparse.Namespace, port: int, result: str) -> None:
    # Only the parent prints to stdout (the one JSON object); ranks' chatter goes to stderr.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(args.threads),  # setup_distributed keeps an explicit choice
    )  # fmt: skip
    torch.set_num_threads(args.threads)
    import logging

    import torch.distributed as dist

    from soho_scale.engine.distributed import setup_distributed

    setup_distributed()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    height, width = map(int, args.image_size.split("x"))
    batch = generated_batch(args.batch, height, width, args.captions, args.text_len, seed=rank)
    variants = [build_variant(name, world, args) for name in args.variants]
    phases = {v.name: {"forward_backward": [], "optimizer_step": []} for v in variants}
    scratch = {"forward_backward": [], "optimizer_step": []}
    for variant in variants:
        for i in range(args.warmup):
            timed_step(variant, batch, seed=10_000 + i, phases=scratch)

    round_means: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(args.rounds):
        shift = r % len(variants)  # rotate the order: no variant always runs first or last
        for variant in variants[shift:] + variants[:shift]:
            dist.barrier()
            start = time.perf_counter()
            for i in range(args.steps):
                timed_step(variant, batch, seed=r * 1000 + i, phases=phases[variant.name])
            dist.barrier()
            round_means[variant.name].append((time.perf_counter() - start) / args.steps)

    memory = {}
    for variant in variants:  # one more step, measured between backward and optimizer step
        torch.manual_seed(99_999)
        variant.forward_backward(batch)
        counts = variant.model_state()
        variant.optimizer_step()
        names = sorted(counts)
        values = torch.tensor([float(counts[n]) for n in names], dtype=torch.float64)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)  # the fullest rank
        memory[variant.name] = {n: int(v) for n, v in zip(names, values.tolist())}
    if rank == 0:
        with open(result, "w") as f:
            json.dump({"round_means": round_means, "phases": phases, "memory": memory}, f)
    dist.barrier()
    dist.destroy_process_group()


def summarize(raw: dict, args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    step_s = {k: statistics.median(v) for k, v in raw["round_means"].items()}
    model_state = {
        k: sum(v.get(c, 0) for c in ("params", "grads", "master_weights", "optimizer_state"))
        for k, v in raw["memory"].items()
    }
    out: dict[str, Any] = {
        "step_s": {k: round(v, 4) for k, v in step_s.items()},
        "step_s_rounds": {k: [round(x, 4) for x in v] for k, v in raw["round_means"].items()},
        "phase_s_median": {
            k: {p: round(statistics.median(t), 4) for p, t in v.items()}
            for k, v in raw["phases"].items()
        },
        "model_state_bytes_per_rank": model_state,
        "model_state_breakdown": raw["memory"],
    }
    if "ddp" in step_s:
        out["ratio_vs_ddp"] = {
            k: round(v / step_s["ddp"], 3) for k, v in step_s.items() if k != "ddp"
        }
    if "zero0" in model_state:
        out["state_ratio_vs_zero0"] = {
            k: round(v / model_state["zero0"], 3) for k, v in model_state.items()
        }
    out["targets"] = TARGETS
    meets = {}
    ratios, states = out.get("ratio_vs_ddp", {}), out.get("state_ratio_vs_zero0", {})
    if "zero1" in ratios:
        meets["zero1_vs_ddp"] = ratios["zero1"] <= TARGETS["zero1_vs_ddp"]
    if "zero2" in ratios:
        meets["zero2_vs_ddp"] = ratios["zero2"] <= TARGETS["zero2_vs_ddp"]
    if "zero3" in states:
        meets["zero3_state_vs_zero0"] = states["zero3"] <= TARGETS["zero3_state_vs_zero0"]
    out["meets_targets"] = meets
    out["config"] = {
        **{k: v for k, v in vars(args).items()},
        "world_size": args.ranks,
        "model": "SohoPretrain(tiny)",
        "precision": "fp32",
        "job": str(DEMO_JOB.relative_to(REPO)),
        "torch": torch.__version__,
        "wall_s": round(elapsed, 1),
        "notes": "model state excludes DDP's C++ reducer buckets and ZeRO's comm buckets "
        "(see model_state_breakdown.other_buffers)",
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--batch", type=int, default=4, help="images per rank")
    parser.add_argument("--captions", type=int, default=2, help="captions per image")
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--image-size", default="64x96", help="padded HxW")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS))
    args = parser.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(ALL_VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(ALL_VARIANTS)}")

    import torch.multiprocessing as mp

    from data_pipeline.loopback import free_port

    # DeepSpeed picks its accelerator at import: CPU + gloo here, whatever the machine has.
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks over gloo even on a GPU machine
    if "TMPDIR" not in os.environ:
        os.environ["TMPDIR"] = private = tempfile.mkdtemp(prefix="soho-bench-")
        atexit.register(shutil.rmtree, private, True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        mp.spawn(run_rank, args=(args.ranks, args, free_port(), result), nprocs=args.ranks)
        with open(result) as f:
            raw = json.load(f)
    print(json.dumps(summarize(raw, args, time.perf_counter() - start)))


if __name__ == "__main__":
    main()
