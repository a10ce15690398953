"""`soho-scale data ...`: write the synthetic world and convert published datasets to shards.

`main(argv)` gets the arguments after the word "data" (soho_scale/cli.py hands them over).
Each subcommand is added by one small `_add_*` function; a `DataError` is printed as one line
without a traceback and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from data_pipeline.errors import DataError
from data_pipeline.shards import DEFAULT_SIZE_LIMIT

Handler = Callable[[argparse.Namespace], Any]


def _writer_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "compression": args.compression,
        "size_limit": args.size_limit,
        "overwrite": args.overwrite,
    }


def _output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd")
    parser.add_argument(
        "--size-limit",
        type=int,
        default=DEFAULT_SIZE_LIMIT,
        help="shard size limit in bytes (default 64 MiB)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _exclude_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="KARPATHY_JSON",
        help="dataset_coco.json / dataset_flickr30k.json (repeatable): leave out the images of "
        "their val and test splits, as SOHO's in-domain data does",
    )


def _add_synthetic(subparsers: Any) -> None:
    parser = subparsers.add_parser("synthetic", help="write the synthetic world (official formats)")
    parser.add_argument("--out", required=True, help="folder to write the world into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=("small", "medium"), default="small")

    def run(args: argparse.Namespace) -> Any:
        from data_pipeline.synthetic import write_world

        return write_world(args.out, seed=args.seed, size=args.size)

    parser.set_defaults(handler=run)


def _add_convert(subparsers: Any) -> None:
    convert = subparsers.add_parser("convert", help="convert a published dataset to MDS shards")
    sources = convert.add_subparsers(dest="source", required=True, metavar="SOURCE")

    def source(
        name: str, help_text: str, run: Handler, split: bool = True
    ) -> argparse.ArgumentParser:
        parser = sources.add_parser(name, help=help_text)
        _output_flags(parser)
        if split:
            parser.add_argument("--split", default=None, help="split name (default: from the file)")
        parser.set_defaults(handler=run)
        return parser

    def coco(args: argparse.Namespace) -> Any:
        from data_pipeline.sources.coco import convert_coco

        return convert_coco(
            args.captions, args.images, args.out, args.split, args.exclude,
            **_writer_options(args),
        )  # fmt: skip

    p = source("coco", "COCO captions_*.json + images", coco)
    p.add_argument("--captions", required=True, help="annotations/captions_train2014.json")
    p.add_argument("--images", required=True, help="folder of the split's images")
    _exclude_flag(p)

    def vg(args: argparse.Namespace) -> Any:
        from data_pipeline.sources.vg import convert_vg

        return convert_vg(
            args.regions, args.image_data, args.images, args.out, args.split or "train",
            args.exclude, **_writer_options(args),
        )  # fmt: skip

    p = source("vg", "Visual Genome region descriptions", vg)
    p.add_argument("--regions", required=True, help="region_descriptions.json")
    p.add_argument("--image-data", required=True, help="image_data.json")
    p.add_argument("--images", required=True, help="folder holding VG_100K/ and VG_100K_2/")
    _exclude_flag(p)

    def vqa(args: argparse.Namespace) -> Any:
        from data_pipeline.sources.vqa import convert_vqa, read_answer_vocab

        if args.answer_vocab and args.vocab_from:
            raise DataError("give --answer-vocab or --vocab-from, not both")
        # a path or where the train split wrote it (s3://)
        vocab = read_answer_vocab(args.answer_vocab) if args.answer_vocab else None
        return convert_vqa(
            args.questions, args.annotations, args.images, args.out, answer_vocab=vocab,
            min_answer_count=args.min_answer_count, keep_unanswerable=args.keep_unanswerable,
            split=args.split, vocab_annotations=args.vocab_from, **_writer_options(args),
        )  # fmt: skip

    p = source("vqa", "VQA v2 questions (+ annotations, except for the test splits)", vqa)
    p.add_argument("--questions", required=True, help="v2_OpenEnded_mscoco_*_questions.json")
    p.add_argument(
        "--annotations",
        default=None,
        help="v2_mscoco_*_annotations.json; leave out for test-dev2015/test2015 (needs --answer-vocab)",
    )
    p.add_argument("--images", required=True, help="folder of the COCO images of the split")
    p.add_argument(
        "--answer-vocab", default=None, help="answer_vocab.json of the train split (path or s3://)"
    )
    p.add_argument("--min-answer-count", type=int, default=9, help="vocab frequency threshold")
    p.add_argument(
        "--vocab-from",
        action="append",
        default=[],
        metavar="ANNOTATIONS_JSON",
        help="build the answer vocabulary from these annotation files (repeatable; train2014 and "
        "val2014 give SOHO's 3129 answers) instead of --annotations",
    )
    p.add_argument(
        "--keep-unanswerable",
        action="store_true",
        help="keep questions with no in-vocabulary answer (evaluation splits)",
    )

    def nlvr2(args: argparse.Namespace) -> Any:
        from data_pipeline.sources.nlvr2 import convert_nlvr2

        return convert_nlvr2(args.json, args.images, args.out, args.split, **_writer_options(args))

    p = source("nlvr2", "NLVR2 JSON lines + image pairs", nlvr2)
    p.add_argument("--json", required=True, help="train.json / dev.json / test1.json")
    p.add_argument("--images", required=True, help="the split's image folder")

    def karpathy(args: argparse.Namespace) -> Any:
        from data_pipeline.sources.karpathy import convert_karpathy

        return convert_karpathy(
            args.json, args.images, args.out, args.split, **_writer_options(args)
        )

    p = source("karpathy", "Karpathy split file (retrieval)", karpathy, split=False)
    p.add_argument("--split", default="test", help="train, restval, val, test, or a,b")
    p.add_argument("--json", required=True, help="dataset_coco.json / dataset_flickr30k.json")
    p.add_argument("--images", required=True, help="COCO root (holding train2014/, val2014/)")

    def snli_ve(args: argparse.Namespace) -> Any:
        from data_pipeline.sources.snli_ve import convert_snli_ve

        return convert_snli_ve(
            args.jsonl, args.images, args.out, args.split, **_writer_options(args)
        )

    p = source("snli-ve", "SNLI-VE JSON lines + Flickr30K images", snli_ve)
    p.add_argument("--jsonl", required=True, help="snli_ve_train.jsonl etc.")
    p.add_argument("--images", required=True, help="flickr30k_images folder")

    def world(args: argparse.Namespace) -> Any:
        from data_pipeline.synthetic import convert_world

        options = _writer_options(args)
        return convert_world(args.world, args.out, **options)

    p = source(
        "synthetic", "all datasets of a synthetic world -> OUT/<dataset>/<split>", world, False
    )
    p.add_argument("--world", required=True, help="folder written by `data synthetic`")


def _add_storage(subparsers: Any) -> None:
    parser = subparsers.add_parser("ls", help="summarise a shard folder (local or s3://)")
    parser.add_argument("url", help="folder or s3://bucket/prefix holding index.json")

    def ls(args: argparse.Namespace) -> Any:
        from data_pipeline.storage import describe_dataset

        return describe_dataset(args.url)

    parser.set_defaults(handler=ls)

    parser = subparsers.add_parser("s3-local", help="run a local S3 API (moto) until Ctrl-C")
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create")

    def s3_local(args: argparse.Namespace) -> Any:
        from data_pipeline.loopback import run_local_s3

        run_local_s3(args.port, args.bucket)

    parser.set_defaults(handler=s3_local)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soho-scale data", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synthetic(subparsers)
    _add_convert(subparsers)
    _add_storage(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.handler(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
