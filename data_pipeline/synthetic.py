"""A small, verifiable vision-language world written in the datasets' official file formats.

`write_world` draws scenes of coloured shapes (`data_pipeline.synthetic_scenes`) and writes,
laid out as the real downloads are: COCO captions + JPEGs, VQA v2 questions/annotations, the
Karpathy split file, Visual Genome regions, NLVR2 JSON lines + PNG pairs, SNLI-VE JSON lines +
Flickr30K-style JPEGs. The converters in `data_pipeline.sources` therefore run unchanged on it
(`convert_world` runs them all), every label is right by construction, and `chance.json` holds
the scores of trivial predictors that a trained model must beat: the majority label, and what
the text alone scores (`question_type_prior_accuracy`, `text_prior`). Same seed -> same bytes.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from typing import Any

from data_pipeline.shards import read_json
from data_pipeline.synthetic_scenes import (
    COLORS,
    NUMBER_WORDS,
    SHAPES,
    Scene,
    captions,
    draw_scene,
    encode,
    human_answers,
    nlvr2_sentence,
    questions,
    random_scene,
    snli_hypothesis,
)

# How many items each split gets. `small` trains a tiny model on 2 CPU cores in minutes.
SIZES = {
    "small": {
        "coco_train": 300,
        "coco_val": 200,  # Karpathy: 1/4 val, 1/2 test, the rest restval
        "questions_per_image": 4,
        "vg": 100,
        "nlvr2_pairs": {"train": 600, "dev": 200, "test1": 100},
        "snli_ve_images": {"train": 200, "dev": 50, "test": 50},
    },
    "medium": {
        "coco_train": 1200,
        "coco_val": 800,
        "questions_per_image": 4,
        "vg": 400,
        "nlvr2_pairs": {"train": 1600, "dev": 400, "test1": 400},
        "snli_ve_images": {"train": 800, "dev": 200, "test": 200},
    },
}
COCO_SPLITS = {"train2014": 1, "val2014": 500_001}  # first image id of each COCO split
RETRIEVAL_K = (1, 5, 10)
SNLI_LABELS = ("entailment", "neutral", "contradiction")
_INFO = {"description": "soho_scale synthetic world", "version": "1.0", "year": 2024}


def _write_json(path: str, obj: Any, lines: bool = False) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if lines:
            f.writelines(json.dumps(record) + "\n" for record in obj)
        else:
            json.dump(obj, f)


def _save_image(path: str, scene: Scene, rng: random.Random, fmt: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(encode(draw_scene(scene, rng), fmt))


def _write_coco_vqa_karpathy(root: str, seed: int, size: dict) -> dict[str, Any]:
    rng = random.Random(f"{seed}-coco")
    counts = {"train2014": size["coco_train"], "val2014": size["coco_val"]}
    karpathy_images, vqa = [], {}
    for subtype, first_id in COCO_SPLITS.items():
        n = counts[subtype]
        images, annotations, vqa_questions, vqa_annotations = [], [], [], []
        for i in range(n):
            image_id = first_id + i
            file_name = f"COCO_{subtype}_{image_id:012d}.jpg"
            scene = random_scene(rng)
            _save_image(os.path.join(root, "coco", subtype, file_name), scene, rng, "JPEG")
            images.append({"id": image_id, "file_name": file_name, "height": scene.height,
                           "width": scene.width, "license": 1})  # fmt: skip
            texts = captions(scene, rng)
            for text in texts:
                annotations.append({"id": len(annotations) + 1 + first_id * 10,
                                    "image_id": image_id, "caption": text})  # fmt: skip
            if subtype == "train2014":
                split = "train"
            else:
                split = "val" if i < n // 4 else "test" if i < n // 4 + n // 2 else "restval"
            karpathy_images.append(
                {
                    "filepath": subtype,
                    "sentids": [],
                    "filename": file_name,
                    "imgid": len(karpathy_images),
                    "split": split,
                    "sentences": [
                        {"tokens": t.rstrip(".").replace(",", "").split(), "raw": t} for t in texts
                    ],
                    "cocoid": image_id,
                }
            )
            for k, (q, answer, answer_type, question_type) in enumerate(
                questions(scene, rng, size["questions_per_image"])
            ):
                question_id = image_id * 1000 + k
                vqa_questions.append({"image_id": image_id, "question": q,
                                      "question_id": question_id})  # fmt: skip
                raw = human_answers(answer, answer_type, rng)
                vqa_annotations.append(
                    {
                        "question_type": question_type,
                        "multiple_choice_answer": answer,
                        "answers": [
                            {
                                "answer": a,
                                "answer_confidence": rng.choice(("yes", "yes", "maybe")),
                                "answer_id": j + 1,
                            }
                            for j, a in enumerate(raw)
                        ],  # fmt: skip
                        "image_id": image_id,
                        "answer_type": answer_type,
                        "question_id": question_id,
                    }
                )
        _write_json(
            os.path.join(root, "coco", "annotations", f"captions_{subtype}.json"),
            {"info": _INFO, "licenses": [{"id": 1, "name": "synthetic"}], "images": images,
             "annotations": annotations},
        )  # fmt: skip
        common = {"info": _INFO, "license": {"name": "synthetic"}, "data_subtype": subtype,
                  "data_type": "mscoco"}  # fmt: skip
        _write_json(
            os.path.join(root, "vqa", f"v2_OpenEnded_mscoco_{subtype}_questions.json"),
            {**common, "task_type": "Open-Ended", "questions": vqa_questions},
        )
        _write_json(
            os.path.join(root, "vqa", f"v2_mscoco_{subtype}_annotations.json"),
            {**common, "annotations": vqa_annotations},
        )
        vqa[subtype] = vqa_annotations
    _write_json(
        os.path.join(root, "karpathy", "dataset_coco.json"),
        {"images": karpathy_images, "dataset": "coco"},
    )
    return {"vqa": vqa, "karpathy": karpathy_images}


def _write_vg(root: str, seed: int, size: dict) -> None:
    rng = random.Random(f"{seed}-vg")
    regions, image_data = [], []
    for image_id in range(1, size["vg"] + 1):
        scene = random_scene(rng)
        _save_image(os.path.join(root, "vg", "VG_100K", f"{image_id}.jpg"), scene, rng, "JPEG")
        image_regions = []
        for s in scene.shapes:
            x = 0 if s.col == "left" else scene.width // 2
            y = 0 if s.row == "top" else scene.height // 2
            for phrase in (f"{s.color} {s.shape}", f"a {s.color} {s.shape} on the {s.col}"):
                image_regions.append({"region_id": image_id * 100 + len(image_regions),
                                      "width": scene.width // 2, "height": scene.height // 2,
                                      "image_id": image_id, "phrase": phrase, "y": y, "x": x})  # fmt: skip
        regions.append({"regions": image_regions, "id": image_id})
        image_data.append({"width": scene.width, "height": scene.height, "image_id": image_id,
                           "url": f"https://cs.stanford.edu/people/rak248/VG_100K/{image_id}.jpg",
                           "coco_id": None, "flickr_id": None})  # fmt: skip
    _write_json(os.path.join(root, "vg", "region_descriptions.json"), regions)
    _write_json(os.path.join(root, "vg", "image_data.json"), image_data)


def _write_nlvr2(root: str, seed: int, size: dict) -> dict[str, list[dict]]:
    """As in NLVR2, one sentence per set of 4 image pairs, true of two and false of two: the
    sentence alone says nothing about the label (50%), so only the images decide it."""
    rng = random.Random(f"{seed}-nlvr2")
    written = {}
    for split, n_pairs in size["nlvr2_pairs"].items():
        records = []
        folder = os.path.join(root, "nlvr2", "images", split)
        for p in range(0, n_pairs, 4):
            set_id = 1000 + p // 4
            sentence, rule = nlvr2_sentence(rng)
            labels = [True, True, False, False]
            rng.shuffle(labels)
            for pair_index, label in enumerate(labels[: n_pairs - p]):
                left, right = random_scene(rng), random_scene(rng)
                while rule(left, right) != label:  # scenes drawn until the sentence has the label
                    left, right = random_scene(rng), random_scene(rng)
                prefix = f"{split}-{set_id}-{pair_index}"
                record_extra: dict[str, Any] = {}
                pair_folder = folder
                if split == "train":  # training images are spread over numbered folders
                    record_extra["directory"] = set_id % 10
                    pair_folder = os.path.join(folder, str(set_id % 10))
                for i, scene in enumerate((left, right)):
                    _save_image(
                        os.path.join(pair_folder, f"{prefix}-img{i}.png"), scene, rng, "PNG"
                    )
                records.append(
                    {
                        "validation": {},
                        "sentence": sentence,
                        "left_url": f"https://example.invalid/{prefix}-img0.png",
                        "writer": f"w{rng.randint(1, 20)}",
                        "label": str(label),
                        "right_url": f"https://example.invalid/{prefix}-img1.png",
                        "synset": "shape",
                        "query": "coloured shapes",
                        "identifier": f"{prefix}-0",
                        "extra_validations": {},
                        **record_extra,
                    }
                )
        _write_json(os.path.join(root, "nlvr2", "data", f"{split}.json"), records, lines=True)
        written[split] = records
    return written


def _write_snli_ve(root: str, seed: int, size: dict) -> dict[str, list[dict]]:
    rng = random.Random(f"{seed}-snli_ve")
    written, next_id = {}, 1_000_000_000
    for split, n_images in size["snli_ve_images"].items():
        records = []
        for _ in range(n_images):
            flickr_id, next_id = next_id, next_id + 7
            scene = random_scene(rng)
            name = f"{flickr_id}.jpg"
            _save_image(os.path.join(root, "snli_ve", "flickr30k_images", name), scene, rng, "JPEG")
            premise = captions(scene, rng)[0]
            for label in SNLI_LABELS:
                records.append(
                    {
                        "annotator_labels": [label],
                        "captionID": f"{name}#0",
                        "gold_label": label,
                        "pairID": f"{name}#0r1{label[0]}",
                        "sentence1": premise,
                        "sentence2": snli_hypothesis(scene, label, rng),
                        "Flikr30kID": name,
                    }
                )
        _write_json(os.path.join(root, "snli_ve", f"snli_ve_{split}.jsonl"), records, lines=True)
        written[split] = records
    return written


# The words that carry a statement's content; the rest of it is its template.
_CONTENT_WORDS = [*COLORS, *SHAPES, *(s + "s" for s in SHAPES), *NUMBER_WORDS, "left", "right"]
_CONTENT = re.compile(r"\b(" + "|".join(_CONTENT_WORDS) + r")\b")


def _text_prior(train: list[tuple[str, str]], evaluate: list[tuple[str, str]]) -> float:
    """Accuracy of a reader who sees only the text: each (text, label) of `evaluate` gets the
    training majority label of its template (the text with colours, shapes, numbers, sides
    blanked). What a model scores above this, it owes to the image."""
    by_template: dict[str, Counter] = {}
    for text, label in train:
        by_template.setdefault(_CONTENT.sub("_", text), Counter())[label] += 1
    overall = Counter(label for _, label in train)
    right = sum(
        by_template.get(_CONTENT.sub("_", text), overall).most_common(1)[0][0] == label
        for text, label in evaluate
    )
    return right / max(len(evaluate), 1)


def _label_chance(splits: dict[str, list[dict]], text: str, label: str) -> dict[str, Any]:
    """The training majority label, its accuracy on every other split, and what the text alone
    scores there (`text_prior`)."""
    train = [(r[text], r[label]) for r in splits["train"]]
    majority = Counter(y for _, y in train).most_common(1)[0][0]
    chance: dict[str, Any] = {"majority_label": majority}
    prior = {}
    for split, records in splits.items():
        if split != "train":
            pairs = [(r[text], r[label]) for r in records]
            chance[split] = sum(y == majority for _, y in pairs) / max(len(pairs), 1)
            prior[split] = _text_prior(train, pairs)
    return {**chance, "text_prior": prior}


def _vqa_chance(train: list[dict], val: list[dict]) -> dict[str, Any]:
    from data_pipeline.vqa_answers import question_accuracy

    def score(annotation: dict, answer: str) -> float:
        return question_accuracy(answer, [a["answer"] for a in annotation["answers"]])

    majority = Counter(a["multiple_choice_answer"] for a in train).most_common(1)[0][0]
    by_type: dict[str, Counter] = {}
    for a in train:
        by_type.setdefault(a["question_type"], Counter())[a["multiple_choice_answer"]] += 1

    def prior(a: dict) -> str:
        return by_type.get(a["question_type"], Counter([majority])).most_common(1)[0][0]

    return {
        "split": "val2014",
        "majority_answer": majority,
        "accuracy": sum(score(a, majority) for a in val) / len(val),
        "question_type_prior_accuracy": sum(score(a, prior(a)) for a in val) / len(val),
        "note": "the official VQA accuracy (data_pipeline.vqa_answers.question_accuracy)",
    }


def _retrieval_chance(karpathy_images: list[dict]) -> dict[str, Any]:
    test = [image for image in karpathy_images if image["split"] == "test"]
    n, per_image = len(test), len(test[0]["sentences"])
    texts = n * per_image
    # Text retrieval hits when any of the image's captions is among the K drawn at random.
    text = {f"r{k}": 1 - math.comb(texts - per_image, k) / math.comb(texts, k) for k in RETRIEVAL_K}
    return {
        "split": "test",
        "num_images": n,
        "captions_per_image": per_image,
        "image_retrieval": {f"r{k}": k / n for k in RETRIEVAL_K},
        "text_retrieval": text,
    }


def write_world(out: str, seed: int = 0, size: str = "small") -> dict[str, Any]:
    """Write the synthetic world under `out`; returns the contents of `chance.json`."""
    if size not in SIZES:
        raise ValueError(f"size {size!r}: use one of {', '.join(SIZES)}")
    sizes = SIZES[size]
    coco = _write_coco_vqa_karpathy(out, seed, sizes)
    _write_vg(out, seed, sizes)
    nlvr2 = _write_nlvr2(out, seed, sizes)
    snli_ve = _write_snli_ve(out, seed, sizes)
    chance = {
        "seed": seed,
        "size": size,
        "vqa": _vqa_chance(coco["vqa"]["train2014"], coco["vqa"]["val2014"]),
        "nlvr2": _label_chance(nlvr2, "sentence", "label"),
        "snli_ve": _label_chance(snli_ve, "sentence2", "gold_label"),
        "retrieval": _retrieval_chance(coco["karpathy"]),
    }
    with open(os.path.join(out, "chance.json"), "w", encoding="utf-8") as f:
        json.dump(chance, f, indent=1)
        f.write("\n")
    return chance


def convert_world(world: str, out: str, **writer_options: Any) -> dict[str, dict]:
    """Run every converter on a world from `write_world`; shards go to `out/<dataset>/<split>`.

    Returns {"<dataset>/<split>": conversion report}. `out` may be a folder or an s3:// URL.
    """
    from data_pipeline.sources.coco import convert_coco
    from data_pipeline.sources.karpathy import convert_karpathy
    from data_pipeline.sources.nlvr2 import convert_nlvr2
    from data_pipeline.sources.snli_ve import convert_snli_ve
    from data_pipeline.sources.vg import convert_vg
    from data_pipeline.sources.vqa import build_answer_vocab, convert_vqa

    def at(*parts: str) -> str:
        return os.path.join(world, *parts)

    def dest(name: str) -> str:
        return out.rstrip("/") + "/" + name

    reports = {}
    for subtype in COCO_SPLITS:
        reports[f"coco/{subtype}"] = convert_coco(
            at("coco", "annotations", f"captions_{subtype}.json"), at("coco", subtype),
            dest(f"coco/{subtype}"), **writer_options,
        )  # fmt: skip
    reports["vg/train"] = convert_vg(
        at("vg", "region_descriptions.json"), at("vg", "image_data.json"), at("vg"),
        dest("vg/train"), **writer_options,
    )  # fmt: skip
    # The training split's vocabulary serves every split; evaluation keeps all questions.
    train_annotations = read_json(at("vqa", "v2_mscoco_train2014_annotations.json"))
    vocab = build_answer_vocab(train_annotations["annotations"], min_count=1)
    for subtype in COCO_SPLITS:
        reports[f"vqa/{subtype}"] = convert_vqa(
            at("vqa", f"v2_OpenEnded_mscoco_{subtype}_questions.json"),
            at("vqa", f"v2_mscoco_{subtype}_annotations.json"), at("coco", subtype),
            dest(f"vqa/{subtype}"), answer_vocab=vocab, keep_unanswerable=subtype != "train2014",
            **writer_options,
        )  # fmt: skip
    for split in ("train,restval", "val", "test"):
        name = "train" if split.startswith("train") else split
        reports[f"karpathy/{name}"] = convert_karpathy(
            at("karpathy", "dataset_coco.json"), at("coco"), dest(f"karpathy/{name}"),
            split=split, **writer_options,
        )  # fmt: skip
    for split in SIZES["small"]["nlvr2_pairs"]:
        reports[f"nlvr2/{split}"] = convert_nlvr2(
            at("nlvr2", "data", f"{split}.json"), at("nlvr2", "images", split),
            dest(f"nlvr2/{split}"), **writer_options,
        )  # fmt: skip
    for split in SIZES["small"]["snli_ve_images"]:
        reports[f"snli_ve/{split}"] = convert_snli_ve(
            at("snli_ve", f"snli_ve_{split}.jsonl"), at("snli_ve", "flickr30k_images"),
            dest(f"snli_ve/{split}"), **writer_options,
        )  # fmt: skip
    return reports
