"""Retrieval evaluation speed, side by side on one synthetic test set (tiny model, CPU or GPU).

(a) naive: every (image, text) pair scored with its own CNN pass (pairs batched like (b));
(b) exact: the CNN once per image, cached visual tokens, every pair scored by ITM;
(c) two-stage: unimodal cosine similarity, then ITM on the top-k images per text / texts per image.
Prints one JSON object. Usage: python benchmarks/retrieval_eval.py [--images 30] [--k 5]
[--weights runs/demo/retrieval/export/model.pt]: recall (and the two-stage R@1 drop) means
something only for a trained model: `--weights` takes exported weights (the demo writes them);
without it the model is the untrained tiny one and only the timings count.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from data_pipeline.sources.karpathy import convert_karpathy
from data_pipeline.synthetic import write_world
from data_pipeline.transforms import ImageTransform, TextTransform
from soho_scale.model.config import build_config
from soho_scale.pretrained import BUNDLED_BERT, resolve_pretrained
from soho_scale.tasks.retrieval import RetrievalModel, recall_at_k
from soho_scale.tasks.retrieval_eval import (
    RetrievalSet,
    evaluate_retrieval,
    load_retrieval_set,
    plan_image_batches,
)

KEYS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")


def test_set(root: str, images: int) -> RetrievalSet:
    """The first `images` images of the synthetic Karpathy test split, all their captions."""
    world = os.path.join(root, "world")
    write_world(world, seed=0, size="small")
    shards = os.path.join(root, "karpathy_test")
    convert_karpathy(
        os.path.join(world, "karpathy", "dataset_coco.json"), os.path.join(world, "coco"), shards
    )
    full = load_retrieval_set(
        shards,
        os.path.join(root, "cache"),
        ImageTransform(64, 96),
        TextTransform(resolve_pretrained(BUNDLED_BERT), max_len=16),
    )
    keep = full.text_to_image < images
    return RetrievalSet(
        [full.images[i] for i in range(images)],
        full.image_sizes[:images],
        full.text_ids[keep],
        full.text_mask[keep],
        full.text_to_image[keep],
    )


@torch.no_grad()
def naive_scores(model: RetrievalModel, data: RetrievalSet, pair_batch: int) -> torch.Tensor:
    """The CNN recomputed for every pair: text chunks x a copy of the image per pair."""
    soho, num_texts = model.soho, len(data.text_ids)
    scores = torch.empty(len(data.images), num_texts)
    for i in range(len(data.images)):
        image = data.images[i]
        for start in range(0, num_texts, pair_batch):
            texts = slice(start, min(start + pair_batch, num_texts))
            count = texts.stop - start
            visual = soho.encode_image(
                image[None].expand(count, -1, -1, -1), data.image_sizes[i : i + 1].expand(count, 2)
            )
            _, pooled = soho.fuse(
                data.text_ids[texts], data.text_mask[texts], soho.embed_visual(visual), visual.mask
            )
            scores[i, texts] = model.match_score(pooled)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--pair-batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", help="exported weights to evaluate (default: untrained)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        data = test_set(root, args.images)
        torch.manual_seed(0)
        if args.weights:
            from soho_scale.engine.weights import load_state, read_weights
            from soho_scale.model.config import SohoConfig

            state, info = read_weights(args.weights)  # one read: config and tensors
            model = RetrievalModel(SohoConfig(**info["config"]))
            load_state(model, state, args.weights)
            model.eval()
        else:
            model = RetrievalModel(build_config("tiny")).eval()
        started = time.perf_counter()
        naive = naive_scores(model, data, args.pair_batch)
        naive_seconds = time.perf_counter() - started
        naive_recall = recall_at_k(naive, data.text_to_image)
        exact = evaluate_retrieval(model, data, pair_batch=args.pair_batch, return_scores=True)
        two = evaluate_retrieval(
            model, data, mode="two_stage", k=args.k, pair_batch=args.pair_batch
        )
    seconds = {"naive": naive_seconds, "exact": exact["seconds"], "two_stage": two["seconds"]}
    num_images, num_texts = len(data.images), len(data.text_ids)
    print(
        json.dumps(
            {
                "model": args.weights or "tiny (untrained, seed 0)",
                "device": "cpu",
                "threads": args.threads,
                "num_images": num_images,
                "num_texts": num_texts,
                "image_batches": len(plan_image_batches(data.image_sizes, 32)),
                "seconds": {k: round(v, 3) for k, v in seconds.items()},
                "images_per_s": {k: round(num_images / v, 2) for k, v in seconds.items()},
                "pairs_scored": {
                    "naive": num_images * num_texts,
                    "exact": exact["pairs_scored"],
                    "two_stage": two["pairs_scored"],
                },
                "two_stage_k": args.k,
                "recall": {
                    "naive": {k: naive_recall[k] for k in KEYS},
                    "exact": {k: exact[k] for k in KEYS},
                    "two_stage": {k: two[k] for k in KEYS},
                },
                "max_abs_diff_naive_vs_exact": float((naive - exact["scores"]).abs().max()),
                "speedup_exact_vs_naive": round(naive_seconds / exact["seconds"], 2),
                "speedup_two_stage_vs_naive": round(naive_seconds / two["seconds"], 2),
                "speedup_two_stage_vs_exact": round(exact["seconds"] / two["seconds"], 2),
                "r1_drop_two_stage": {
                    "tr": exact["tr_r1"] - two["tr_r1"],
                    "ir": exact["ir_r1"] - two["ir_r1"],
                },
            }
        )
    )


if __name__ == "__main__":
    main()
