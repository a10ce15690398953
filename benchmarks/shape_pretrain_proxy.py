"""A small stand-in for the demo's pre-training, probed for shape as it trains.

One process, no DeepSpeed, no storage: the demo pre-training job (jobs/demo/pretrain.yaml, with
any dotted overrides) builds the real step module (`build_step`: the model and `pretrain_loss`),
the real optimizer groups, LR schedule and gradient clipping, and the real sample processor
(resize, captions, MLM masking) over an in-memory world like the demo's: 300 COCO-style scenes
with their 5 captions and 100 VG-style ones with their region phrases, drawn as
`data_pipeline.synthetic` draws them. Every `--probe-every` steps the vision path is probed as
benchmarks/shape_probe.py does (fresh scenes; shape and colour of each drawn shape, linear
probes on the neck, the VD word and the tokens the transformer reads). The demo runs 800 steps of
32 images on 2 ranks (16 per rank: BatchNorm sees 16); here a step is one batch of
`batch.micro_batch_per_rank` images, so at the default 16 it is half a demo step's data.

    .venv/bin/python benchmarks/shape_pretrain_proxy.py --steps 300
    .venv/bin/python benchmarks/shape_pretrain_proxy.py --steps 300 objectives.itc_weight=0

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import shape_probe  # noqa: E402

from data_pipeline.collate import collate_captions  # noqa: E402
from data_pipeline.synthetic_scenes import captions, draw_scene, encode, random_scene  # noqa: E402
from data_pipeline.transforms import ImageTransform  # noqa: E402
from soho_scale.engine.optimizer import build_optimizer, lr_factor  # noqa: E402
from soho_scale.engine.step import build_step  # noqa: E402
from soho_scale.spec.load import load_job  # noqa: E402
from soho_scale.tasks import sample_processor  # noqa: E402


def world(seed: int, coco: int = 300, vg: int = 100) -> list[dict]:
    """Raw samples as the converters write them: JPEG bytes and the image's captions."""
    rng = random.Random(f"{seed}-proxy")
    raw = []
    for i in range(coco + vg):
        scene = random_scene(rng)
        image = encode(draw_scene(scene, rng), "JPEG")
        if i < coco:
            texts = captions(scene, rng)
        else:
            texts = [
                phrase
                for s in scene.shapes
                for phrase in (f"{s.color} {s.shape}", f"a {s.color} {s.shape} on the {s.col}")
            ]
        raw.append({"image": image, "captions": texts})
    return raw


def probe(model, items: list[dict], seed: int) -> dict:  # noqa: ANN001
    was_training = model.training
    data = shape_probe.extract(model, items, bn_batch_stats=False)
    model.train(was_training)
    result = shape_probe.report(data, seed)
    points = {
        name: {"shape": row["shape"], "color": row["color"]}
        for name, row in result["points"].items()
        if name in ("c3", "c4", "neck", "vd_word", "gate_tokens")
    }
    return {"points": points, "vd_index_lookup": result.get("vd_index_lookup")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="dotted job overrides")
    parser.add_argument("--job", default=str(REPO / "jobs" / "demo" / "pretrain.yaml"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--probe-every", type=int, default=100)
    parser.add_argument("--probe-images", type=int, default=400)
    parser.add_argument("--c5-stride-16", action="store_true", help="last stage at stride 16")
    parser.add_argument(
        "--cnn-adamw", type=float, default=None, help="the CNN on AdamW at this LR, not SGD"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    job = load_job(args.job, args.overrides)
    torch.manual_seed(job.seed)
    step_module = build_step(job)
    model = step_module.model
    if args.c5_stride_16:
        shape_probe.c5_at_stride_16(model.soho)
    optimizer = build_optimizer(step_module, job.optim)
    if args.cnn_adamw:  # every group on AdamW; the CNN's at its own LR
        rest = job.optim.rest
        groups = [
            {"params": g["params"], "lr": args.cnn_adamw if g["name"] == "cnn" else rest.lr}
            for g in optimizer.param_groups
        ]
        optimizer = torch.optim.AdamW(
            groups, betas=tuple(rest.betas), eps=rest.eps, weight_decay=rest.weight_decay
        )
    # The demo's decay points, scaled to this run's length.
    scale = args.steps / job.schedule.steps
    schedule = functools.partial(
        lr_factor,
        warmup_steps=job.schedule.warmup_steps,
        warmup_start_factor=job.schedule.warmup_start_factor,
        decay_steps=[round(s * scale) for s in job.schedule.decay_steps or []],
        gamma=job.schedule.gamma,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    processor = sample_processor(job)
    raw = world(job.seed)
    image = job.data.image
    probe_items = shape_probe.probe_set(
        args.probe_images, 1234, ImageTransform(min_size=image.min_size, max_size=image.max_size)
    )
    batch_size = job.batch.micro_batch_per_rank
    params = [p for p in step_module.parameters() if p.requires_grad]
    order: list[int] = []
    epoch = 0
    history, losses, started = [], [], time.time()
    train_seconds = 0.0
    step_module.train()
    for step in range(1, args.steps + 1):
        if len(order) < batch_size:
            epoch += 1
            order += random.Random(f"{job.seed}:{epoch}").sample(range(len(raw)), len(raw))
        rows, order = order[:batch_size], order[batch_size:]
        batch = collate_captions([processor(raw[r], r, epoch) for r in rows])
        tick = time.time()
        loss, metrics = step_module(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, job.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        train_seconds += time.time() - tick
        losses.append({k: round(float(v), 3) for k, v in metrics.items() if "loss" in k})
        losses[-1].update(
            {k: round(float(metrics[k]), 3) for k in ("itm_acc", "mlm_acc") if k in metrics}
        )
        if step % args.probe_every == 0 or step == args.steps:
            window = losses[-args.probe_every :]
            mean = {
                k: round(sum(x.get(k, 0.0) for x in window) / len(window), 3) for k in window[0]
            }
            history.append({"step": step, "train": mean, **probe(model.soho, probe_items, 1234)})
            print(json.dumps(history[-1]), file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "job": args.job,
                "overrides": args.overrides,
                "steps": args.steps,
                "images_per_step": batch_size,
                "train_seconds_per_step": round(train_seconds / args.steps, 3),
                "seconds": round(time.time() - started, 1),
                "history": history,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
