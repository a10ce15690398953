"""Pre-training throughput and MFU on one accelerator; writes one JSON file (and prints it).

Modes, each skipped with a reason when what it needs is not importable:
- torch_in_memory: the real model + objective (`PretrainStep`) and the trainer's optimizer
  (`build_optimizer`: SGD for the CNN, AdamW for the rest) in plain PyTorch, bf16 autocast over
  fp32 weights, on generated batches held in memory. Needs torch, torchvision, transformers only.
- torch_streamed: the same loop fed by data_pipeline's streaming loader from local MDS shards of
  generated JPEGs (needs mosaicml-streaming and the bundled tokenizer).
- deepspeed_in_memory: the trainer's engine path (`prepare_for_engine` on the production
  pre-training job, `deepspeed.initialize`, engine(batch) / backward / step; needs deepspeed).

MFU = 3 x forward FLOPs (telemetry.FlopModel, from each batch's real padded size and its MLM
positions) / time / peak. Timed steps run after warm-up, between two device synchronisations.

    python benchmarks/gpu_pretrain.py --preset r101-l12 --image-size 600x1000 --micro-batch 16
    python benchmarks/gpu_pretrain.py --device cpu --preset tiny --image-size 64x96 --steps 2
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_overhead import generated_batch  # noqa: E402 - sibling script, not a package

REPO = Path(__file__).resolve().parent.parent
PRETRAIN_JOB = REPO / "jobs" / "pretrain" / "soho_r101_l12_coco_vg.yaml"
# The paper's optimizer settings (as in PRETRAIN_JOB), for the torch-only modes that must run
# without pydantic/yaml.
OPTIM = SimpleNamespace(
    cnn=SimpleNamespace(lr=1e-2, momentum=0.9, weight_decay=1e-4),
    rest=SimpleNamespace(lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6),
    grad_clip=10.0,
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict:
    """Move tensors; floating ones (images) take the engine's compute dtype, as the trainer does."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if dtype != torch.float32 and value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def in_memory_batches(args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """Four generated batches (real sizes vary inside the padded size), cycled by the modes."""
    return [
        generated_batch(args.micro_batch, args.height, args.width, args.captions, args.text_len, i)
        for i in range(4)
    ]


class Measure:
    """Per-step FLOPs and sample counts between two synchronisations."""

    def __init__(self, flop_model: Any) -> None:
        self.flop_model = flop_model
        self.images = self.texts = 0
        self.flops = 0.0

    def add(self, batch: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
        self.images += batch["images"].shape[0]
        self.texts += batch["text_ids"].shape[0]
        mlm = int(metrics["mlm_count"]) if "mlm_count" in metrics else 0
        self.flops += self.flop_model.forward_flops(batch, mlm)

    def result(self, elapsed: float, steps: int, peak: float) -> dict[str, float]:
        achieved = 3 * self.flops / elapsed
        return {
            "samples_per_s": self.images / elapsed,
            "texts_per_s": self.texts / elapsed,
            "step_s": elapsed / steps,
            "train_tflops_per_s": achieved / 1e12,
            "mfu": achieved / peak,
            "forward_gflops_per_step": self.flops / steps / 1e9,
        }


def phased_step(device, phases, forward, backward, update) -> tuple[torch.Tensor, dict]:  # noqa: ANN001
    """One training step: forward() -> (loss, metrics), backward(loss), update(). With a
    `phases` dict, each phase is timed between device synchronisations and appended to it."""
    marks = [time.perf_counter()]

    def mark() -> None:
        if phases is not None:
            synchronize(device)
            marks.append(time.perf_counter())

    loss, metrics = forward()
    mark()
    backward(loss)
    mark()
    update()
    mark()
    if phases is not None:
        for name, a, b in zip(("forward", "backward", "optimizer"), marks, marks[1:]):
            phases.setdefault(name, []).append(b - a)
    return loss, metrics


def torch_loop(args, device, step_module, batches, flop_model, data_wait=None) -> dict:  # noqa: ANN001
    """Plain PyTorch: autocast forward, backward, clip, the trainer's optimizer."""
    from soho_scale.engine.optimizer import build_optimizer

    optimizer = build_optimizer(step_module, OPTIM)
    params = [p for p in step_module.parameters() if p.requires_grad]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def forward(batch: dict) -> tuple[torch.Tensor, dict]:
        with autocast:
            return step_module(batch)

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(params, OPTIM.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step(batch: dict, phases: dict | None = None) -> tuple[torch.Tensor, dict]:
        return phased_step(device, phases, lambda: forward(batch), torch.Tensor.backward, update)

    return run_timed(args, device, step, batches, flop_model, data_wait)


def run_timed(args, device, step, batches, flop_model, data_wait=None) -> dict:  # noqa: ANN001
    source = iter(batches)

    def next_batch() -> dict:
        start = time.perf_counter()
        batch = to_device(next(source), device, torch.float32)
        if args.channels_last:
            batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
        if data_wait is not None:
            data_wait.append(time.perf_counter() - start)
        return batch

    for _ in range(args.warmup):
        step(next_batch())
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if data_wait is not None:
        data_wait.clear()
    measure = Measure(flop_model)
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = next_batch()
        loss, metrics = step(batch)
        measure.add(batch, metrics)
    synchronize(device)
    elapsed = time.perf_counter() - start
    out = measure.result(elapsed, args.steps, args.peak_flops)
    phases: dict[str, list[float]] = {}
    for _ in range(args.breakdown_steps):  # separate steps: a sync after each phase
        step(next_batch(), phases)
    if phases:
        out["breakdown_ms"] = {k: 1000 * sum(v) / len(v) for k, v in phases.items()}
    if data_wait is not None:
        out["data_wait_fraction"] = sum(data_wait[: args.steps]) / elapsed
    out["loss_last"] = float(loss.detach().float())
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def cycle(items: list) -> Any:
    while True:
        yield from items


def mode_torch_in_memory(args, device, model_factory, flop_model) -> dict:  # noqa: ANN001
    step_module = model_factory().to(device)
    batches = cycle(in_memory_batches(args))
    return torch_loop(args, device, step_module, batches, flop_model)


def write_shards(folder: str, count: int, height: int, width: int) -> None:
    from PIL import Image
    from streaming import MDSWriter

    generator = torch.Generator().manual_seed(0)
    encoded = []
    for _ in range(8):  # a few distinct JPEGs, reused: decode cost is what matters
        pixels = (torch.rand(height // 8, width // 8, 3, generator=generator) * 255).byte()
        image = Image.fromarray(pixels.numpy()).resize((width, height), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    columns = {"source": "str", "split": "str", "image_id": "str", "image": "bytes",
               "captions": "json"}  # fmt: skip
    with MDSWriter(out=folder, columns=columns, hashes=["sha1", "xxh64"]) as writer:
        for i in range(count):
            captions = [f"a generated picture number {i} with shapes {k}" for k in range(5)]
            writer.write({"source": "bench", "split": "train", "image_id": str(i),
                          "image": encoded[i % len(encoded)], "captions": captions})  # fmt: skip


def mode_torch_streamed(args, device, model_factory, flop_model) -> dict:  # noqa: ANN001
    for module in ("streaming", "data_pipeline.streaming"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return {"skipped": f"{module} is not importable"}
    from data_pipeline.loader import build_loader
    from data_pipeline.samples import SampleProcessor
    from data_pipeline.streaming import build_dataset
    from data_pipeline.transforms import ImageTransform, TextTransform
    from soho_scale.pretrained import BUNDLED_BERT, resolve_pretrained

    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    total = (args.warmup + args.steps + args.breakdown_steps) * args.micro_batch
    with tempfile.TemporaryDirectory() as tmp:
        shards = os.path.join(tmp, "shards")
        write_shards(shards, total, args.height, args.width)
        short, long = sorted((args.height, args.width))
        processor = SampleProcessor(
            task="pretrain",
            image=ImageTransform(min_size=short, max_size=long),
            text=TextTransform(resolve_pretrained(BUNDLED_BERT), max_len=args.text_len),
            captions_per_image=args.captions,
        )
        dataset = build_dataset(
            [shards], processor, os.path.join(tmp, "cache"), args.micro_batch, shuffle=False
        )
        loader = build_loader(dataset, args.micro_batch, num_workers=args.workers)
        step_module = model_factory().to(device)
        waits: list[float] = []
        out = torch_loop(args, device, step_module, iter(loader), flop_model, waits)
        out["workers"] = args.workers
        return out


def mode_deepspeed_in_memory(args, device, model_factory, flop_model) -> dict:  # noqa: ANN001
    if importlib.util.find_spec("deepspeed") is None:
        return {"skipped": "deepspeed is not importable"}
    # ZeRO flattens parameters into one buffer with plain views: NHWC weights cannot go in.
    args = argparse.Namespace(**{**vars(args), "channels_last": False})
    import deepspeed

    from soho_scale.engine.deepspeed_config import prepare_for_engine
    from soho_scale.engine.distributed import setup_distributed
    from soho_scale.engine.optimizer import build_optimizer
    from soho_scale.spec import load_job

    job = load_job(
        PRETRAIN_JOB,
        [
            f"precision={args.precision}",
            f"deepspeed.zero_stage={args.zero_stage}",
            f"batch.micro_batch_per_rank={args.micro_batch}",
            f"batch.global_batch={args.micro_batch}",
            "resources.procs_per_node=1",
        ],
    )
    setup_distributed()
    step_module = model_factory(False)  # not build_step: init_from needs the BERT download
    config, dtype = prepare_for_engine(step_module, job, 1)  # cast + config, as the trainer does
    engine, _, _, _ = deepspeed.initialize(
        model=step_module, optimizer=build_optimizer(step_module, job.optim), config=config
    )

    def step(batch: dict, phases: dict | None = None) -> tuple[torch.Tensor, dict]:
        batch = to_device(batch, device, dtype)
        return phased_step(device, phases, lambda: engine(batch), engine.backward, engine.step)

    out = run_timed(args, device, step, cycle(in_memory_batches(args)), flop_model)
    out["zero_stage"] = args.zero_stage
    return out


MODES = {
    "torch_in_memory": mode_torch_in_memory,
    "torch_streamed": mode_torch_streamed,
    "deepspeed_in_memory": mode_deepspeed_in_memory,
}


def default_output() -> str:
    return os.path.join(os.environ.get("OUT") or ".", "gpu_pretrain.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="r101-l12")
    parser.add_argument("--image-size", default="600x1000", help="padded HxW of a batch")
    parser.add_argument("--micro-batch", type=int, default=16, help="images per step")
    parser.add_argument("--captions", type=int, default=4, help="captions per image")
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--breakdown-steps", type=int, default=3, help="steps timed per phase")
    parser.add_argument("--peak-flops", type=float, default=989e12, help="dense bf16 peak, FLOP/s")
    parser.add_argument("--zero-stage", type=int, default=2, help="for deepspeed_in_memory")
    parser.add_argument("--workers", type=int, default=8, help="loader workers (streamed)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument(
        "--channels-last", action="store_true", help="NHWC CNN weights and images (torch modes)"
    )
    parser.add_argument("--out", default=default_output())
    args = parser.parse_args(argv)
    args.height, args.width = map(int, args.image_size.lower().split("x"))
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    missing = [m for m in ("torchvision", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"gpu_pretrain: {', '.join(missing)} not importable; the model needs them")
    from soho_scale.engine.step import PretrainStep
    from soho_scale.engine.telemetry import FlopModel
    from soho_scale.model.config import build_config
    from soho_scale.model.soho import SohoPretrain
    from soho_scale.objectives import PretrainSettings

    config = build_config(args.preset)

    def model_factory(channels_last: bool = args.channels_last) -> torch.nn.Module:
        torch.manual_seed(0)
        step = PretrainStep(SohoPretrain(config), PretrainSettings())
        if channels_last:  # 4-D weights only; the transformer is unaffected
            step.to(memory_format=torch.channels_last)
        return step

    flop_model = FlopModel(config)
    results: dict[str, Any] = {}
    for name in args.modes:
        try:
            results[name] = MODES[name](args, device, model_factory, flop_model)
        except Exception as e:  # one mode failing must not lose the others' numbers
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"gpu_pretrain: {name}: {json.dumps(results[name])[:300]}", file=sys.stderr)
    report = {
        "results": results,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("height", "width")},
            "torch": torch.__version__,
            "flops_note": "train FLOPs = 3 x forward; forward from FlopModel per batch",
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}))
    return report


if __name__ == "__main__":
    main()
