"""`make demo`: the whole system on embedded defaults (CPU, no network, no downloads).

1. starts a local S3 API server (moto) on loopback and uses a local MLflow store (sqlite);
2. writes the synthetic vision-language world in the datasets' official formats;
3. converts it to MDS shards on the S3 server with the real converters, and streams a few
   pre-training epoch back (the first batches' shapes and the counts printed);
4. runs jobs/pipelines/demo.yaml: 2 CPU ranks, DeepSpeed ZeRO-2 pre-training of the tiny model,
   then VQA, NLVR2, retrieval and SNLI-VE fine-tuning and evaluation;
5. prints the results table (ours, chance, published SOHO) and ends with `report: PATH`.
Re-running skips the stages that finished (the world and shards are rebuilt: moto keeps data in
memory only).

`make ablation` (`--sweep jobs/sweeps/demo_ablation.yaml [--only VARIANT ...]`) runs steps 1-3
and then the sweep of the demo pipeline instead, while the shards are served.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

PIPELINE = "jobs/pipelines/demo.yaml"
RUN_ROOT = "runs/demo"


def _stream_back(cache: str) -> None:
    from data_pipeline.loader import build_loader
    from data_pipeline.samples import SampleProcessor
    from data_pipeline.streaming import StreamSource, build_dataset
    from data_pipeline.transforms import ImageTransform, TextTransform
    from soho_scale.pretrained import BUNDLED_BERT, resolve_pretrained

    processor = SampleProcessor(
        task="pretrain",
        image=ImageTransform(min_size=64, max_size=96),
        text=TextTransform(resolve_pretrained(BUNDLED_BERT), max_len=16),
        captions_per_image=2,
    )
    dataset = build_dataset(
        [StreamSource("s3://soho-demo/coco/train2014")], processor, cache, batch_size=8
    )
    loader = build_loader(dataset, batch_size=8, num_workers=1)
    # The whole epoch: a worker that exits while streaming's threads still fetch shards can die
    # in interpreter shutdown (SIGABRT from a thread killed inside C++ code).
    read = 0
    for i, batch in enumerate(loader):
        read += int(batch["sample_valid"].sum())
        if i < 3:
            shapes = {k: tuple(v.shape) for k, v in batch.items()}
            masked = int((batch["mlm_labels"] != -100).sum())
            print(f"  batch {i}: {shapes}  MLM-masked tokens: {masked}")
    print(
        f"  {read} of the stream's {dataset.num_samples} samples read back; "
        f"skipped (undecodable): {loader.skipped}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m soho_scale.demo",
        description="the demo pipeline (or, with --sweep, a sweep of it) on the synthetic world",
    )
    parser.add_argument(
        "--sweep", metavar="SPEC", help="run this sweep instead (make ablation: the demo's)"
    )
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="with --sweep: these only")
    args = parser.parse_args(argv)
    if args.only and not args.sweep:
        parser.error("--only: only with --sweep")

    from data_pipeline.loopback import LocalS3Server
    from data_pipeline.synthetic import convert_world, write_world

    started = time.time()
    world = os.path.join(RUN_ROOT, "world")
    os.makedirs(RUN_ROOT, exist_ok=True)
    with LocalS3Server(buckets=["soho-demo"]) as s3:
        print(f"[demo] local S3 API server (moto) at {s3.endpoint_url}", flush=True)
        if not os.path.exists(os.path.join(world, "chance.json")):
            write_world(world, seed=0, size="small")
        print(f"[demo] synthetic world in {world}", flush=True)
        reports = convert_world(world, "s3://soho-demo")
        for name, report in reports.items():
            skipped = sum(report.get("skipped", {}).values())
            print(f"  s3://soho-demo/{name:<18} {report['written']:>5} samples, {skipped} skipped")
        if args.sweep:  # the shards live as long as this server: the sweep runs inside it
            return _sweep(args.sweep, args.only, started)
        print("[demo] streaming a few pre-training batches back from S3:", flush=True)
        # In a process of its own: every rank's loader later removes "stale" streaming shared
        # memory, this check's included, and this process's exit would then warn about it.
        check = multiprocessing.get_context("spawn").Process(
            target=_stream_back, args=(os.path.join(RUN_ROOT, "stream_check_cache"),)
        )
        check.start()
        check.join()
        if check.exitcode != 0:
            raise SystemExit(
                f"[demo] streaming the shards back failed (exit code {check.exitcode})"
            )
        print(f"[demo] pipeline {PIPELINE} (2 CPU ranks, ZeRO-2)", flush=True)
        from soho_scale.pipeline import run_pipeline

        report_dir = run_pipeline(PIPELINE)
    with open(os.path.join(report_dir, "results.md")) as f:
        print(f.read())
    with open(os.path.join(world, "chance.json")) as f:
        seed = json.load(f).get("seed")
    print(f"[demo] finished in {(time.time() - started) / 60:.1f} min (world seed {seed})")
    print("[demo] MLflow: `make ui`, then open http://127.0.0.1:5000 (experiment soho-demo)")
    print(f"report: {os.path.abspath(report_dir)}")
    return 0


def _sweep(spec: str, only: list[str] | None, started: float) -> int:
    from soho_scale.sweep import sweep_main

    argv = [spec, *(["--only", *only] if only else [])]
    print(f"[demo] sweep {spec}", flush=True)
    code = sweep_main(argv)
    print(f"[demo] sweep finished in {(time.time() - started) / 60:.1f} min (exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
