"""The synthetic world: deterministic, in the official formats, labels consistent with pixels."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from PIL import Image

from data_pipeline.cli import main
from data_pipeline.sources.nlvr2 import pair_id, sentence_id
from data_pipeline.synthetic import SIZES, write_world
from data_pipeline.synthetic_scenes import COLORS, IMAGE_SIZES
from data_pipeline.vqa_answers import normalize_answer


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _load(path: Path) -> object:
    return json.loads(path.read_text())


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _colours_in(path: Path) -> set[str]:
    """Colour names with a visible patch of pixels in the image (JPEG noise tolerated)."""
    image = Image.open(path).convert("RGB")
    counts: Counter[str] = Counter()
    for n, pixel in image.getcolors(maxcolors=1 << 16) or []:
        for name, rgb in COLORS.items():
            if all(abs(a - b) <= 40 for a, b in zip(pixel, rgb)):
                counts[name] += n
    return {name for name, n in counts.items() if n >= 20}


def test_same_seed_same_bytes_other_seed_other_bytes(synthetic_world: Path, tmp_path: Path) -> None:
    assert main(["synthetic", "--out", str(tmp_path / "again"), "--seed", "0"]) == 0
    first, again = _files(synthetic_world), _files(tmp_path / "again")
    assert first.keys() == again.keys()
    assert [k for k in first if first[k] != again[k]] == []
    write_world(str(tmp_path / "other"), seed=1)
    other = _files(tmp_path / "other")
    assert (
        other["coco/annotations/captions_train2014.json"]
        != first["coco/annotations/captions_train2014.json"]
    )


def test_coco_and_karpathy_formats(synthetic_world: Path) -> None:
    size = SIZES["small"]
    data = _load(synthetic_world / "coco/annotations/captions_train2014.json")
    assert len(data["images"]) == size["coco_train"]
    shapes = set()
    for image in data["images"]:
        assert {"id", "file_name", "height", "width"} <= image.keys()
        with Image.open(synthetic_world / "coco/train2014" / image["file_name"]) as im:
            assert im.format == "JPEG" and im.size == (image["width"], image["height"])
            shapes.add(im.size)
    assert shapes == set(IMAGE_SIZES)  # square, landscape and portrait all occur
    per_image = Counter(a["image_id"] for a in data["annotations"])
    assert set(per_image.values()) == {5}
    assert all(a["caption"].strip() for a in data["annotations"])

    karpathy = _load(synthetic_world / "karpathy/dataset_coco.json")["images"]
    splits = Counter(image["split"] for image in karpathy)
    assert splits == {"train": 300, "test": 100, "val": 50, "restval": 50}
    for image in karpathy[:5] + karpathy[-5:]:
        assert (synthetic_world / "coco" / image["filepath"] / image["filename"]).is_file()
        assert all(s["raw"] and s["tokens"] for s in image["sentences"])


def test_vqa_answers_normalise_to_the_label_and_match_the_pixels(synthetic_world: Path) -> None:
    questions = _load(synthetic_world / "vqa/v2_OpenEnded_mscoco_val2014_questions.json")
    annotations = _load(synthetic_world / "vqa/v2_mscoco_val2014_annotations.json")
    assert questions["data_subtype"] == "val2014"
    by_id = {a["question_id"]: a for a in annotations["annotations"]}
    assert len(by_id) == len(questions["questions"]) == 4 * SIZES["small"]["coco_val"]
    raw_spellings = set()
    checked = 0
    for q in questions["questions"]:
        a = by_id[q["question_id"]]
        assert a["image_id"] == q["image_id"]
        assert len(a["answers"]) == 10 and [x["answer_id"] for x in a["answers"]] == list(
            range(1, 11)
        )
        label = a["multiple_choice_answer"]
        normalised = Counter(normalize_answer(x["answer"]) for x in a["answers"])
        # The label keeps a full soft score; the right answer's spellings outnumber the wrong
        # ones, "Yes!" included (the challenge server keeps its "!": "yes!").
        assert normalised[label] >= 3
        assert normalised[label] + normalised[label + "!"] >= 8
        raw_spellings.update(x["answer"] for x in a["answers"])
        if q["question"].startswith(("what color is the", "how many")) and checked < 60:
            checked += 1
            path = synthetic_world / f"coco/val2014/COCO_val2014_{q['image_id']:012d}.jpg"
            colours = _colours_in(path)
            answer = a["multiple_choice_answer"]
            if answer in COLORS:
                assert answer in colours, (q, colours)
            colour = q["question"].split()[2]
            if colour in COLORS and answer == "0":
                assert colour not in colours, (q, colours)
    assert checked > 20
    # The spellings the normalisation must fold together, and one it keeps apart, really occur.
    assert {"two", "Red.", "Yes!"} <= raw_spellings
    assert any(s.startswith("a ") for s in raw_spellings)


def test_nlvr2_identifiers_images_and_balance(synthetic_world: Path) -> None:
    for split in ("train", "dev", "test1"):
        records = _lines(synthetic_world / f"nlvr2/data/{split}.json")
        labels = Counter(r["label"] for r in records)
        assert set(labels) == {"True", "False"}
        assert labels["True"] == labels["False"]
        for r in records:
            assert {"identifier", "sentence", "label", "left_url", "right_url", "writer",
                    "synset", "query"} <= r.keys()  # fmt: skip
            assert r["identifier"].startswith(split + "-") and len(r["identifier"].split("-")) == 4
            folder = synthetic_world / "nlvr2/images" / split / str(r.get("directory", ""))
            for i in (0, 1):
                assert (folder / f"{pair_id(r['identifier'])}-img{i}.png").is_file()
        # As in NLVR2, one sentence describes the 4 pairs of a set: true of two, false of two,
        # so the sentence alone says nothing about the label.
        sentences: dict[str, list[dict]] = {}
        for r in records:
            sentences.setdefault(sentence_id(r["identifier"]), []).append(r)
        for members in sentences.values():
            assert len({r["sentence"] for r in members}) == 1
            assert len({pair_id(r["identifier"]) for r in members}) == len(members) == 4
            assert Counter(r["label"] for r in members) == {"True": 2, "False": 2}


def test_snli_ve_labels_balanced_and_images_exist(synthetic_world: Path) -> None:
    records = _lines(synthetic_world / "snli_ve/snli_ve_train.jsonl")
    assert Counter(r["gold_label"] for r in records) == {
        "entailment": 200,
        "neutral": 200,
        "contradiction": 200,
    }
    for r in records[:30]:
        assert r["pairID"].startswith(r["Flikr30kID"])
        path = synthetic_world / "snli_ve/flickr30k_images" / r["Flikr30kID"]
        if r["gold_label"] == "contradiction" and r["sentence2"].endswith(
            "shape is in the picture."
        ):
            assert r["sentence2"].split()[1] not in _colours_in(path)
        if r["gold_label"] == "entailment" and r["sentence2"].startswith("there is a"):
            assert r["sentence2"].split()[3] in _colours_in(path)


def test_visual_genome_files(synthetic_world: Path) -> None:
    regions = _load(synthetic_world / "vg/region_descriptions.json")
    image_data = _load(synthetic_world / "vg/image_data.json")
    assert len(regions) == len(image_data) == SIZES["small"]["vg"]
    assert all(r["phrase"] for entry in regions for r in entry["regions"])
    assert (synthetic_world / "vg/VG_100K" / image_data[0]["url"].rsplit("/", 1)[1]).is_file()


def test_chance_json(synthetic_world: Path) -> None:
    chance = _load(synthetic_world / "chance.json")
    assert chance["retrieval"]["num_images"] == 100
    assert chance["retrieval"]["image_retrieval"]["r5"] == 5 / 100
    assert 0.04 < chance["retrieval"]["text_retrieval"]["r5"] < 0.06
    assert chance["nlvr2"]["dev"] == 0.5
    # What the text alone scores: nothing for NLVR2 (each sentence is true of half its pairs);
    # SNLI-VE's neutral hypotheses are told apart by their wording, as in the real dataset.
    assert chance["nlvr2"]["text_prior"] == {"dev": 0.5, "test1": 0.5}
    assert 0.6 < chance["snli_ve"]["text_prior"]["dev"] < 0.75
    assert abs(chance["snli_ve"]["dev"] - 1 / 3) < 1e-9
    vqa = chance["vqa"]
    # A trivial prior is weak: there is room for a model to beat it twice over.
    assert 0.05 < vqa["accuracy"] < 0.35
    assert vqa["accuracy"] < vqa["question_type_prior_accuracy"] < 0.7
