"""Pre-training throughput, MFU and where the step's time goes, on one accelerator; writes one
JSON file (and prints it).

Modes, each skipped with a reason when what it needs is not importable:
- trainer: `soho-scale train` itself (one rank, DeepSpeed ZeRO-2 from the production pre-training
  job) on MDS shards of generated JPEGs at the padded size, streamed through the job's loader;
  it runs 2 x --steps steps, logging after each half: the figures are those of the second half
  (samples/s, MFU, data wait, peak memory, the phase split of soho_scale.engine.phases). Needs
  deepspeed and mosaicml-streaming.
- torch_in_memory: the same model + objective (`PretrainStep`) and optimizer (`build_optimizer`)
  in plain PyTorch, bf16 autocast over fp32 weights, on generated uint8 batches of the same size
  held in memory: the baseline, with the trainer's speed settings (cuDNN autotuning; NHWC input
  on CUDA). Also one step's FLOPs as torch's FlopCounterMode counts them, against the FLOP model
  MFU uses, and (CUDA) the host syncs one step makes (`torch.cuda.set_sync_debug_mode`).
- torch_in_memory_nchw / torch_in_memory_nhwc_weights: the baseline with NCHW input, and with
  NHWC weights as well (which ZeRO's flat parameter buffer cannot keep).
- torch_streamed: the baseline fed by data_pipeline's loader from the same kind of shards.
- trainer_compiled / torch_in_memory_compiled: trainer and baseline with `model.overrides.compile`
  (torch.compile of the CNN's trunk and the transformer's layers); warm-up includes compiling.

MFU = 3 x forward FLOPs (telemetry.FlopModel, from each batch's real padded size and its MLM
positions) / time / peak. Timed steps run after warm-up, between two device synchronisations.

    python benchmarks/gpu_pretrain.py --preset r101-l12 --image-size 600x1000 --micro-batch 16
    python benchmarks/gpu_pretrain.py --device cpu --preset tiny --image-size 64x96 --steps 2
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

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


def in_memory_batches(args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """Four generated batches, cycled by the modes: padded to the full size and to 32 pixels less
    each way, in turn (real sizes vary inside), as batches of different largest images come:
    cuDNN autotunes both and a compiled model meets a second shape within warm-up."""
    sizes = [(args.height, args.width), (args.height - 32, args.width - 32)]
    return [
        generated_batch(args.micro_batch, *sizes[i % 2], args.captions, args.text_len, i)
        for i in range(4)
    ]


def torch_loop(args, device, step_module, batches, flop_model) -> dict:  # noqa: ANN001
    """Plain PyTorch: autocast forward, backward, clip, the trainer's optimizer; measured with
    the trainer's own meter (samples/s, MFU, data wait, peak memory) and phase clock."""
    from soho_scale.engine.distributed import to_device
    from soho_scale.engine.optimizer import build_optimizer
    from soho_scale.engine.phases import PhaseClock
    from soho_scale.engine.telemetry import Throughput

    optimizer = build_optimizer(step_module, OPTIM)
    params = [p for p in step_module.parameters() if p.requires_grad]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    clock = PhaseClock(device).attach(step_module.model)
    meter = Throughput()
    source = iter(batches)

    def step() -> tuple[torch.Tensor, dict]:
        wait_start = time.perf_counter()
        batch = next(source)
        tokens = int(batch["text_mask"].sum())  # counted on the host, as the trainer does
        batch = to_device(batch, device)
        wait = time.perf_counter() - wait_start
        with clock.span("forward"), autocast:
            loss, metrics = step_module(batch)
        with clock.span("backward"):
            loss.backward()
        with clock.span("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, OPTIM.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        clock.step_done()
        flops = flop_model.forward_flops(batch, int(metrics.get("mlm_count", 0)))
        meter.add(batch["images"].shape[0], tokens, flops, wait)
        return loss, metrics

    for _ in range(args.warmup):
        step()
    out = {}
    if args.count_flops:  # one step, untimed: what torch counts against what MFU assumes
        meter.reset()
        with FlopCounterMode(display=False) as counter:
            step()
        out["flop_counter_tflops_per_step"] = counter.get_total_flops() / 1e12
        out["flop_model_tflops_per_step"] = 3 * meter.flops / 1e12
    if device.type == "cuda":
        out["host_syncs_per_step"] = host_syncs(step)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    clock.collect()
    meter.reset()
    for _ in range(args.steps):
        loss, _ = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out.update(meter.summary(1, args.peak_flops))
    out.update(clock.collect())
    out["loss_last"] = float(loss.detach().float())
    return out


def host_syncs(run_step) -> dict:  # noqa: ANN001
    """The host syncs one step makes: count and where (torch warns at each in "warn" mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = [
        f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
    ]
    return {"count": len(sites), "sites": sorted(set(sites))}


def mode_torch(layout: str | None, compiled: bool = False):  # noqa: ANN201
    """The plain-torch baseline on in-memory batches; `layout`: None (the trainer's: NHWC input
    on CUDA), "nchw", or "nhwc_weights" (NHWC input and weights); `compiled`: the model's
    `compile` option."""

    def run(args, device, model_factory, flop_model) -> dict:  # noqa: ANN001
        if compiled:  # compiled graphs may run under FlopCounterMode uncounted
            args = argparse.Namespace(**{**vars(args), "count_flops": False})
        step_module = model_factory(layout, compiled).to(device)
        batches = itertools.cycle(in_memory_batches(args))
        return torch_loop(args, device, step_module, batches, flop_model)

    return run


def write_shards(folder: str, count: int, height: int, width: int) -> None:
    """Pre-training shards as `soho-scale data convert` writes them (data_pipeline.shards)."""
    from PIL import Image

    from data_pipeline.shards import ShardWriter

    generator = torch.Generator().manual_seed(0)
    encoded = []
    for _ in range(8):  # a few distinct JPEGs, reused: decode cost is what matters
        pixels = (torch.rand(height // 8, width // 8, 3, generator=generator) * 255).byte()
        image = Image.fromarray(pixels.numpy()).resize((width, height), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    columns = {"image": "bytes", "captions": "json"}
    with ShardWriter(folder, columns, source="bench", split="train") as writer:
        for i in range(count):
            captions = [f"a generated picture number {i} with shapes {k}" for k in range(5)]
            writer.write({"image_id": str(i), "image": encoded[i % len(encoded)],
                          "captions": captions})  # fmt: skip


def mode_torch_streamed(args, device, model_factory, flop_model) -> dict:  # noqa: ANN001
    if not importable("streaming"):
        return {"skipped": "streaming is not importable"}
    from data_pipeline.loader import build_loader
    from data_pipeline.samples import SampleProcessor
    from data_pipeline.streaming import build_dataset
    from data_pipeline.transforms import ImageTransform, TextTransform
    from soho_scale.pretrained import BUNDLED_BERT, resolve_pretrained

    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    total = (args.warmup + args.steps + 2) * args.micro_batch  # + the FLOP count and sync steps
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
        step_module = model_factory(None, False).to(device)
        out = torch_loop(args, device, step_module, iter(loader), flop_model)
        out["workers"] = args.workers
        return out


def random_trunk_weights(preset: str, path: str) -> str:
    """A weights file of the preset's CNN at torchvision's random initialisation: the job's
    `cnn_init` (ImageNet weights are not on a machine without network; speed is the same)."""
    from soho_scale.model.config import build_config
    from soho_scale.model.vision import _RESNETS

    block, layers = _RESNETS[build_config(preset).backbone]
    from torchvision.models.resnet import ResNet

    torch.save(ResNet(block, layers).state_dict(), path)
    return path


def trainer_job(args, tmp: str, shards: str, compiled: bool) -> str:  # noqa: ANN001
    """The production pre-training job at this benchmark's sizes, on `shards`, as a file."""
    import yaml

    from soho_scale.pretrained import BUNDLED_BERT
    from soho_scale.spec.yaml_file import read_job_file

    job = read_job_file(str(PRETRAIN_JOB))
    short, long = sorted((args.height, args.width))
    overrides = job["model"]["overrides"]
    overrides.update(init_from=None, cnn_init=random_trunk_weights(args.preset, f"{tmp}/cnn.pt"))
    overrides["compile"] = compiled
    job["model"]["preset"] = args.preset
    job["data"].update(
        streams=[{"remote": shards}], workers=args.workers, captions_per_image=args.captions
    )
    job["data"]["image"].update(min_size=short, max_size=long)
    job["data"]["text"].update(max_len=args.text_len)
    job["data"]["text"]["tokenizer"] = BUNDLED_BERT  # offline: the bundled BERT vocabulary
    job["precision"] = args.precision
    job["deepspeed"]["zero_stage"] = args.zero_stage
    # Two log points: after `steps` warm-up steps (compiling, shard downloads), and after
    # `steps` timed ones: the last log covers exactly the timed steps.
    job["schedule"].update(steps=2 * args.steps, epochs=None, decay_epochs=[])
    job["batch"] = {"micro_batch_per_rank": args.micro_batch, "global_batch": args.micro_batch}
    job["checkpoint"].update(dir=f"{tmp}/checkpoints", interval_steps=10**6, keep_last=1)
    job["tracking"].update(log_every=args.steps)
    job["resources"] = {"nodes": 1, "procs_per_node": 1, "peak_flops": args.peak_flops}
    path = f"{tmp}/job.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(job, f, sort_keys=False)
    return path


def mode_trainer(compiled: bool):  # noqa: ANN201
    """`soho-scale train` itself; `compiled`: with model.overrides.compile."""
    return lambda args, device, model_factory, flop_model: run_trainer(args, device, compiled)


def run_trainer(args, device, compiled: bool) -> dict:  # noqa: ANN001
    missing = [m for m in ("deepspeed", "streaming", "yaml", "pydantic") if not importable(m)]
    if missing:
        return {"skipped": f"not importable: {', '.join(missing)}"}
    with tempfile.TemporaryDirectory() as tmp:
        shards = os.path.join(tmp, "shards")
        write_shards(shards, (2 * args.steps + 1) * args.micro_batch, args.height, args.width)
        run_dir = os.path.join(tmp, "run")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        if device.type == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        command = [sys.executable, "-m", "soho_scale.cli", "train", trainer_job(args, tmp, shards, compiled),
                   "--nproc", "1", "--run-dir", run_dir]  # fmt: skip
        # Its own process group: a timeout kills the ranks too (they hold the GPU).
        with subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        ) as proc:  # fmt: skip
            try:
                _, stderr = proc.communicate(timeout=args.trainer_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                _, stderr = proc.communicate()
                return {
                    "error": f"timed out after {args.trainer_timeout} s",
                    "trace": stderr[-4000:],
                }
        summary = os.path.join(run_dir, "summary.json")
        if proc.returncode != 0 or not os.path.exists(summary):
            return {"error": f"soho-scale train exited {proc.returncode}", "trace": stderr[-4000:]}
        with open(summary) as f:
            final = json.load(f)["final_metrics"]
    keys = ("samples_per_s", "mfu", "data_wait_fraction", "peak_memory_gb", "loss")
    out = {k: final[k] for k in keys if k in final}
    out.update({k: v for k, v in final.items() if k.startswith("phase_")})
    out.update(workers=args.workers, zero_stage=args.zero_stage)
    return out


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


MODES = {  # in the order they run: what the GPU issue needs first
    "trainer": mode_trainer(False),
    "torch_in_memory": mode_torch(None),
    "torch_in_memory_nchw": mode_torch("nchw"),
    "torch_in_memory_nhwc_weights": mode_torch("nhwc_weights"),
    "trainer_compiled": mode_trainer(True),
    "torch_in_memory_compiled": mode_torch(None, compiled=True),
    "torch_streamed": mode_torch_streamed,
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
    parser.add_argument("--peak-flops", type=float, default=989e12, help="dense bf16 peak, FLOP/s")
    parser.add_argument("--zero-stage", type=int, default=2, help="for the trainer")
    parser.add_argument("--workers", type=int, default=8, help="loader workers (streamed modes)")
    parser.add_argument("--trainer-timeout", type=int, default=600, help="seconds per trainer run")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--count-flops", action=argparse.BooleanOptionalAction, default=True,
        help="count one step's FLOPs with FlopCounterMode (torch modes)",
    )  # fmt: skip
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
        torch.backends.cudnn.benchmark = True  # as the trainer
    missing = [m for m in ("torchvision", "transformers") if not importable(m)]
    if missing:
        sys.exit(f"gpu_pretrain: {', '.join(missing)} not importable; the model needs them")
    from soho_scale.engine.step import PretrainStep
    from soho_scale.engine.telemetry import FlopModel
    from soho_scale.model.config import build_config
    from soho_scale.model.soho import SohoPretrain
    from soho_scale.objectives import PretrainSettings

    config = build_config(args.preset)

    def model_factory(layout: str | None, compiled: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = SohoPretrain(build_config(args.preset, compile=compiled))
        step = PretrainStep(model, PretrainSettings())
        if layout is not None:
            step.model.soho.vision.channels_last = layout == "nhwc_weights"
        if layout == "nhwc_weights":  # 4-D weights only; the transformer is unaffected
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
        report = write_report(args, device, results)  # after each mode: a timeout keeps them
    print(json.dumps({k: v for k, v in report.items() if k != "config"}))
    return report


def write_report(args: argparse.Namespace, device: torch.device, results: dict) -> dict:
    base = results.get("torch_in_memory", {}).get("samples_per_s")
    ratios = {
        f"{name}_vs_torch_in_memory": r["samples_per_s"] / base
        for name, r in results.items()
        if base and name != "torch_in_memory" and r.get("samples_per_s")
    }
    report = {
        "results": results,
        "ratios": ratios,
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
    return report


if __name__ == "__main__":
    main()
