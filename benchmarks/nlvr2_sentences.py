"""NLVR2 dev accuracy of a demo run, per sentence template of the synthetic world.

The world's NLVR2 sentences come from a few templates over colours, shapes, sides and counts;
this groups a run's dev predictions (`<run>/nlvr2-eval/eval/nlvr2_dev_predictions.csv`) by
template (colour -> C, shape -> S, side -> X, count -> N) and reports the accuracy of each and of
every sentence that names a shape (the ones colour alone cannot decide):

    .venv/bin/python benchmarks/nlvr2_sentences.py runs/demo
    .venv/bin/python benchmarks/nlvr2_sentences.py runs/demo_ablation/base/seed0 --world runs/demo/world

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_pipeline.synthetic_scenes import COLORS, NUMBER_WORDS, SHAPES  # noqa: E402


def _words(words) -> str:  # noqa: ANN001
    return r"\b(" + "|".join(words) + r")\b"


_WORDS = (
    (_words(COLORS), "C"),
    (r"\b(" + "|".join(SHAPES) + r")s?\b", "S"),
    (_words(("left", "right")), "X"),
    (_words(NUMBER_WORDS), "N"),
)


def template(sentence: str) -> str:
    for pattern, mark in _WORDS:
        sentence = re.sub(pattern, mark, sentence)
    return sentence


def by_template(dev_path: str, predictions_path: str) -> dict:
    with open(dev_path) as f:
        dev = [json.loads(line) for line in f if line.strip()]
    with open(predictions_path) as f:
        predicted = {row[0]: row[1] for row in csv.reader(f) if row}
    groups: dict[str, list[bool]] = {}
    for record in dev:
        if record["identifier"] in predicted:
            right = predicted[record["identifier"]].lower() == record["label"].lower()
            groups.setdefault(template(record["sentence"]), []).append(right)
    shape = [x for name, hits in groups.items() if re.search(r"\bS\b", name) for x in hits]

    def accuracy(hits: list[bool]) -> float | None:
        return round(100 * sum(hits) / len(hits), 1) if hits else None

    return {
        "pairs": sum(len(v) for v in groups.values()),
        "shape_sentences": {"accuracy": accuracy(shape), "n": len(shape)},
        "templates": {
            name: {"accuracy": accuracy(hits), "n": len(hits)}
            for name, hits in sorted(groups.items())
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a demo pipeline's run folder (runs/demo)")
    parser.add_argument("--world", help="the synthetic world (default: <run>/world)")
    args = parser.parse_args(argv)
    world = args.world or os.path.join(args.run, "world")
    predictions = os.path.join(args.run, "nlvr2-eval", "eval", "nlvr2_dev_predictions.csv")
    result = by_template(os.path.join(world, "nlvr2", "data", "dev.json"), predictions)
    json.dump({"run": args.run, **result}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
