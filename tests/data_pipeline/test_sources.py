"""Converters: the synthetic world's official files -> MDS shards that plain streaming reads."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import boto3
import pytest
from PIL import Image
from streaming import StreamingDataset
from streaming.base.format import reader_from_json

from data_pipeline.cli import main
from data_pipeline.errors import DataError
from data_pipeline.sources.coco import convert_coco
from data_pipeline.sources.karpathy import convert_karpathy
from data_pipeline.sources.nlvr2 import convert_nlvr2
from data_pipeline.sources.snli_ve import convert_snli_ve
from data_pipeline.sources.vg import convert_vg
from data_pipeline.sources.vqa import build_answer_vocab, convert_vqa, soft_targets
from data_pipeline.vqa_answers import normalize_answer, question_accuracy
from tests.data_pipeline.helpers import jpeg


def _read_mds(folder: Path) -> list[dict]:
    """Every sample of an MDS folder, in order, through streaming's own shard readers."""
    index = json.loads((folder / "index.json").read_text())
    samples = []
    for info in index["shards"]:
        assert info["raw_data"]["hashes"].keys() == {"sha1", "xxh64"}
        reader = reader_from_json(str(folder), None, info)
        samples.extend(reader.get_item(i) for i in range(reader.samples))
    return samples


def _report(folder: Path) -> dict:
    return json.loads((folder / "conversion_report.json").read_text())


def _json(path: Path) -> object:
    return json.loads(path.read_text())


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("Red.", "red"), ("a red", "red"), ("two", "2"), ("Two.", "2"), ("Yes!", "yes!"),
     ("the  Circle ", "circle"), ("dont", "don't"), ("1,000", "1000"), ("3.5", "3.5"),
     ("none", "0"), ("left-hand", "left hand")],
)  # fmt: skip
def test_normalize_answer_follows_the_official_eval(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_soft_targets_are_the_official_accuracy_of_each_answer() -> None:
    """0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / 4+ of ten humans (the metric's leave-one-out mean,
    bottom-up-attention's get_score), matched as the metric matches: "2." is "2", but the human
    "Two" is not the prediction "2" (the metric processes only punctuation of human answers)."""
    vocab = {"2": 0, "3": 1, "yes": 2, "4": 3}
    labels, scores = soft_targets(["two", "2", "2.", "Two", "3", "3", "4", "2", "2", "2"], vocab)
    assert labels == [0, 1, 3] and scores == pytest.approx([1.0, 0.6, 0.3])
    for n, score in ((1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)):
        assert soft_targets(["3"] * n + ["4"] * (10 - n), vocab)[1][0] == pytest.approx(score)
    # the target is what predicting that answer scores
    humans = ["2", "2", "Two", "two", "2", "3", "3", "3", "3", "3"]
    labels, scores = soft_targets(humans, vocab)
    by_answer = dict(zip(labels, scores))
    for answer, index in vocab.items():
        assert by_answer.get(index, 0.0) == pytest.approx(question_accuracy(answer, humans))


def test_coco_shards_read_back_with_plain_streaming(
    synthetic_world: Path, synthetic_shards: Path
) -> None:
    folder = synthetic_shards / "coco/val2014"
    dataset = StreamingDataset(local=str(folder), remote=None, shuffle=False, batch_size=1)
    source = _json(synthetic_world / "coco/annotations/captions_val2014.json")
    assert len(dataset) == len(source["images"]) == _report(folder)["written"]
    first = source["images"][0]
    sample = dataset[0]
    expected = [a["caption"] for a in source["annotations"] if a["image_id"] == first["id"]]
    assert sample["captions"] == expected
    assert sample["image"] == (synthetic_world / "coco/val2014" / first["file_name"]).read_bytes()
    assert (sample["source"], sample["split"], sample["image_id"]) == (
        "coco",
        "val2014",
        str(first["id"]),
    )


def test_vqa_shards_have_vocab_labels_and_soft_scores(
    synthetic_world: Path, synthetic_shards: Path
) -> None:
    folder = synthetic_shards / "vqa/train2014"
    vocab = _json(folder / "answer_vocab.json")
    assert {"yes", "no", "red", "circle", "1", "2", "3", "left"} <= set(vocab)
    assert not any(a[0].isupper() or a.endswith(".") or a.startswith("a ") for a in vocab)
    samples = _read_mds(folder)
    annotations = _json(synthetic_world / "vqa/v2_mscoco_train2014_annotations.json")
    assert len(samples) == len(annotations["annotations"]) == _report(folder)["written"]
    for sample, annotation in zip(samples[:50], annotations["annotations"][:50]):
        assert sample["question_id"] == annotation["question_id"]
        assert sample["answers"] == [a["answer"] for a in annotation["answers"]]
        assert sample["answer_type"] == annotation["answer_type"]
        # each answer's target is what predicting it scores (the synthetic humans also write
        # "the triangle" and "Triangle.", which the metric does not match to "triangle")
        humans = [a["answer"] for a in annotation["answers"]]
        by_label = dict(zip(sample["answer_labels"], sample["answer_scores"]))
        for label, answer in enumerate(vocab):
            assert by_label.get(label, 0.0) == pytest.approx(question_accuracy(answer, humans))
        assert all(0 < s <= 1 for s in sample["answer_scores"])
        Image.open(io.BytesIO(sample["image"])).verify()
    assert _report(synthetic_shards / "vqa/val2014")["num_answers"] == len(vocab)


def test_vqa_vocabulary_from_train_and_val_annotations(
    synthetic_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SOHO's 3129 answers are counted over train2014 + val2014: `--vocab-from` pools the
    annotation files; a threshold only the pooled counts reach keeps answers one split lacks."""
    vqa = synthetic_world / "vqa"
    train, val = (vqa / f"v2_mscoco_{s}2014_annotations.json" for s in ("train", "val"))
    pooled = _json(train)["annotations"] + _json(val)["annotations"]
    argv = ["convert", "vqa", "--questions", str(vqa / "v2_OpenEnded_mscoco_val2014_questions.json"),
            "--annotations", str(val), "--images", str(synthetic_world / "coco/val2014"),
            "--min-answer-count", "40"]  # fmt: skip
    assert main([*argv, "--vocab-from", str(train), "--vocab-from", str(val),
                 "--out", str(tmp_path / "pooled")]) == 0  # fmt: skip
    assert _json(tmp_path / "pooled/answer_vocab.json") == build_answer_vocab(pooled, 40)
    assert main([*argv, "--out", str(tmp_path / "val_only")]) == 0
    val_only = _json(tmp_path / "val_only/answer_vocab.json")
    assert set(val_only) < set(_json(tmp_path / "pooled/answer_vocab.json"))
    capsys.readouterr()
    assert main([*argv, "--vocab-from", str(train), "--answer-vocab", str(tmp_path / "x.json"),
                 "--out", str(tmp_path / "both")]) == 2  # fmt: skip
    assert "not both" in capsys.readouterr().err


def test_vqa_answer_vocab_is_read_from_where_the_train_split_wrote_it(
    synthetic_world: Path, tmp_path: Path, s3, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README converts val/test with `--answer-vocab`: the train split's answer_vocab.json,
    which its conversion wrote beside its shards, on S3 as often as not."""
    from data_pipeline.storage import s3_client

    vqa = synthetic_world / "vqa"
    vocab = ["yes", "no", "2"]
    s3_client().put_object(Bucket="shards", Key="vocab/answer_vocab.json", Body=json.dumps(vocab))
    argv = ["convert", "vqa", "--questions", str(vqa / "v2_OpenEnded_mscoco_val2014_questions.json"),
            "--annotations", str(vqa / "v2_mscoco_val2014_annotations.json"),
            "--images", str(synthetic_world / "coco/val2014")]  # fmt: skip
    out = tmp_path / "val"
    assert main([*argv, "--answer-vocab", "s3://shards/vocab/answer_vocab.json",
                 "--out", str(out)]) == 0  # fmt: skip
    assert _json(out / "answer_vocab.json") == vocab
    capsys.readouterr()
    assert main([*argv, "--answer-vocab", "s3://shards/vocab/none.json",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    (line,) = capsys.readouterr().err.splitlines()
    assert "s3://shards/vocab/none.json" in line


def test_nlvr2_shards_pair_images_and_labels(synthetic_world: Path, synthetic_shards: Path) -> None:
    folder = synthetic_shards / "nlvr2/train"
    records = _lines(synthetic_world / "nlvr2/data/train.json")
    samples = _read_mds(folder)
    assert len(samples) == len(records)
    for sample, record in zip(samples[:20], records[:20]):
        assert sample["identifier"] == record["identifier"]
        assert sample["label"] == (1 if record["label"] == "True" else 0)
        prefix = record["identifier"].rsplit("-", 1)[0]
        assert sample["image_id"] == prefix
        png = (
            synthetic_world / "nlvr2/images/train" / str(record["directory"]) / f"{prefix}-img1.png"
        )
        stored = Image.open(io.BytesIO(sample["image_right"]))
        assert stored.format == "PNG"
        assert stored.convert("RGB").tobytes() == Image.open(png).convert("RGB").tobytes()


def test_snli_ve_karpathy_and_vg_shards(synthetic_world: Path, synthetic_shards: Path) -> None:
    snli = _read_mds(synthetic_shards / "snli_ve/dev")
    assert sorted({s["label"] for s in snli}) == [0, 1, 2] and len(snli) == 150
    record = _lines(synthetic_world / "snli_ve/snli_ve_dev.jsonl")[1]
    assert (snli[1]["pair_id"], snli[1]["hypothesis"], snli[1]["label"]) == (
        record["pairID"],
        record["sentence2"],
        1,
    )
    test = _read_mds(synthetic_shards / "karpathy/test")
    assert len(test) == 100 and all(len(s["captions"]) == 5 for s in test)
    assert _report(synthetic_shards / "karpathy/train")["written"] == 350
    vg = _read_mds(synthetic_shards / "vg/train")
    assert len(vg) == 100 and all(len(set(s["captions"])) == len(s["captions"]) for s in vg)


def test_captions_are_cleaned_and_vg_phrases_deduplicated_as_the_tokenizer_reads_them(
    tmp_path: Path,
) -> None:
    images = tmp_path / "VG_100K"
    images.mkdir()
    (images / "1.jpg").write_bytes(jpeg(0))
    phrases = ["a man", "A  man", "bad \ud800 dog", "\u200b\u200b", "a hat"]
    regions = tmp_path / "region_descriptions.json"
    # json.dumps keeps the lone surrogate as the escape a real file would hold
    regions.write_text(json.dumps([{"id": 1, "regions": [{"phrase": p} for p in phrases]}]))
    image_data = tmp_path / "image_data.json"
    image_data.write_text(json.dumps([{"image_id": 1}]))
    report = convert_vg(str(regions), str(image_data), str(tmp_path), str(tmp_path / "out"))
    assert report["skipped"] == {"empty_caption": 1}
    (sample,) = _read_mds(tmp_path / "out")
    assert sample["captions"] == ["a man", "bad  dog", "a hat"]


def test_duplicates_and_orphan_captions_are_counted_and_an_empty_conversion_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "train2014"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg(0))
    captions = tmp_path / "captions_train2014.json"
    captions.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "a.jpg"}],
        "annotations": [{"image_id": 1, "caption": "a photo"}, {"image_id": 9, "caption": "x"},
                        {"image_id": 9, "caption": "y"}],
    }))  # fmt: skip
    report = convert_coco(str(captions), str(images), str(tmp_path / "out"))
    assert report["written"] == 1 and report["records"] == 2
    assert report["skipped"] == {"duplicate_image": 1, "caption_without_image": 2}
    # A wrong --images folder: every image missing. The conversion fails, naming why, and
    # leaves no report (nothing looks finished).
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    argv = ["convert", "coco", "--captions", str(captions), "--images", str(empty),
            "--out", str(tmp_path / "none")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no sample written (of 2 records; skipped: " in err and "missing_image" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "none" / "conversion_report.json").exists()


def test_snli_ve_reads_the_generator_scripts_image_field(
    synthetic_world: Path, synthetic_shards: Path, tmp_path: Path
) -> None:
    """The SNLI-VE generator writes "Flickr30K_ID" without ".jpg"; the released files
    "Flikr30kID" with it: both convert to the same samples."""
    records = _lines(synthetic_world / "snli_ve/snli_ve_dev.jsonl")[:5]
    renamed = tmp_path / "snli_ve_dev.jsonl"
    with renamed.open("w") as f:
        for record in records:
            image = record.pop("Flikr30kID")
            record["Flickr30K_ID"] = image.removesuffix(".jpg")
            f.write(json.dumps(record) + "\n")
    images = synthetic_world / "snli_ve/flickr30k_images"
    convert_snli_ve(str(renamed), str(images), str(tmp_path / "out"))
    assert _read_mds(tmp_path / "out") == _read_mds(synthetic_shards / "snli_ve/dev")[:5]


def test_bad_samples_are_skipped_and_counted(synthetic_world: Path, tmp_path: Path) -> None:
    images = tmp_path / "train2014"
    shutil.copytree(synthetic_world / "coco/train2014", images)
    captions = _json(synthetic_world / "coco/annotations/captions_train2014.json")
    names = [image["file_name"] for image in captions["images"]]
    (images / names[0]).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / names[1]).unlink()
    captions["annotations"][10]["caption"] = "   "
    captions_file = tmp_path / "captions_train2014.json"
    captions_file.write_text(json.dumps(captions))
    report = convert_coco(str(captions_file), str(images), str(tmp_path / "coco"), size_limit=4096)
    assert report["skipped"] == {"bad_image": 1, "missing_image": 1, "empty_caption": 1}
    assert report["written"] == len(names) - 2 == len(_read_mds(tmp_path / "coco"))
    assert _report(tmp_path / "coco") == report
    assert len(_json(tmp_path / "coco/index.json")["shards"]) > 1  # --size-limit honoured

    # VQA reads the same images: each image has 4 questions.
    report = convert_vqa(
        str(synthetic_world / "vqa/v2_OpenEnded_mscoco_train2014_questions.json"),
        str(synthetic_world / "vqa/v2_mscoco_train2014_annotations.json"),
        str(images), str(tmp_path / "vqa"), min_answer_count=1,
    )  # fmt: skip
    assert report["skipped"] == {"bad_image": 4, "missing_image": 4}
    assert report["split"] == "train2014"


def test_out_of_vocabulary_question_is_counted(synthetic_world: Path, tmp_path: Path) -> None:
    annotations = _json(synthetic_world / "vqa/v2_mscoco_train2014_annotations.json")
    vocab = sorted(
        {normalize_answer(a["multiple_choice_answer"]) for a in annotations["annotations"]}
    )
    for answer in annotations["annotations"][3]["answers"]:
        answer["answer"] = "zebra"
    annotations_file = tmp_path / "v2_mscoco_train2014_annotations.json"
    annotations_file.write_text(json.dumps(annotations))
    questions = str(synthetic_world / "vqa/v2_OpenEnded_mscoco_train2014_questions.json")
    images = str(synthetic_world / "coco/train2014")
    report = convert_vqa(questions, str(annotations_file), images, str(tmp_path / "a"),
                         answer_vocab=vocab)  # fmt: skip
    assert report["skipped"] == {"no_answer_in_vocab": 1}
    kept = convert_vqa(questions, str(annotations_file), images, str(tmp_path / "b"),
                       answer_vocab=vocab, keep_unanswerable=True)  # fmt: skip
    assert kept["written"] == report["written"] + 1


def _break(path: Path, record: str, drop: str, tmp_path: Path, lines: bool = False) -> Path:
    """A copy of an annotation file whose first `record` lacks the field `drop`."""
    out = tmp_path / path.name
    if lines:
        records = _lines(path)
        del records[0][drop]
        out.write_text("\n".join(json.dumps(r) for r in records))
    else:
        data = _json(path)
        target = data[record][0] if record else data[0]
        del target[drop]
        out.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize(
    ("name", "drop"),
    [("coco", "caption"), ("vqa", "multiple_choice_answer"), ("nlvr2", "label"),
     ("snli_ve", "Flikr30kID"), ("karpathy", "sentences"), ("vg", "phrase")],
)  # fmt: skip
def test_missing_field_fails_at_once_naming_file_and_field(
    synthetic_world: Path, tmp_path: Path, name: str, drop: str
) -> None:
    w = synthetic_world
    out = str(tmp_path / "out")
    if name == "coco":
        bad = _break(w / "coco/annotations/captions_val2014.json", "annotations", drop, tmp_path)
        call = lambda: convert_coco(str(bad), str(w / "coco/val2014"), out)  # noqa: E731
    elif name == "vqa":
        bad = _break(w / "vqa/v2_mscoco_val2014_annotations.json", "annotations", drop, tmp_path)
        questions = str(w / "vqa/v2_OpenEnded_mscoco_val2014_questions.json")
        call = lambda: convert_vqa(questions, str(bad), str(w / "coco/val2014"), out)  # noqa: E731
    elif name == "nlvr2":
        bad = _break(w / "nlvr2/data/dev.json", "", drop, tmp_path, lines=True)
        call = lambda: convert_nlvr2(str(bad), str(w / "nlvr2/images/dev"), out)  # noqa: E731
    elif name == "snli_ve":
        bad = _break(w / "snli_ve/snli_ve_dev.jsonl", "", drop, tmp_path, lines=True)
        images = str(w / "snli_ve/flickr30k_images")
        call = lambda: convert_snli_ve(str(bad), images, out)  # noqa: E731
    elif name == "karpathy":
        bad = _break(w / "karpathy/dataset_coco.json", "images", drop, tmp_path)
        call = lambda: convert_karpathy(str(bad), str(w / "coco"), out)  # noqa: E731
    else:
        data = _json(w / "vg/region_descriptions.json")
        del data[0]["regions"][0][drop]
        bad = tmp_path / "region_descriptions.json"
        bad.write_text(json.dumps(data))
        image_data = str(w / "vg/image_data.json")
        call = lambda: convert_vg(str(bad), image_data, str(w / "vg"), out)  # noqa: E731
    with pytest.raises(DataError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and str(bad) in message and repr(drop) in message
    assert not (tmp_path / "out").exists()  # failed before writing anything


def test_cli_prints_one_line_for_invalid_json_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "captions_train2014.json"
    bad.write_text('{"images": [}')
    argv = ["convert", "coco", "--captions", str(bad), "--images", str(tmp_path), "--out", "x"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "Traceback" not in err


def test_cli_convert_with_compression_and_refuses_non_empty_out(
    synthetic_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nlvr2"
    argv = ["convert", "nlvr2", "--json", str(synthetic_world / "nlvr2/data/dev.json"),
            "--images", str(synthetic_world / "nlvr2/images/dev"), "--out", str(out),
            "--compression", "zstd"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "dev"
    assert _json(out / "index.json")["shards"][0]["compression"] == "zstd"
    dataset = StreamingDataset(local=str(out), remote=None, shuffle=False, batch_size=1)
    assert len(dataset) == len(_lines(synthetic_world / "nlvr2/data/dev.json"))
    assert dataset[len(dataset) - 1]["identifier"].startswith("dev-")
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_s3_round_trip(synthetic_world: Path, s3, tmp_path: Path) -> None:
    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    client.create_bucket(Bucket="soho-test")
    report = convert_coco(
        str(synthetic_world / "coco/annotations/captions_val2014.json"),
        str(synthetic_world / "coco/val2014"),
        "s3://soho-test/coco/val2014",
    )
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="soho-test")["Contents"]}
    assert {"coco/val2014/index.json", "coco/val2014/conversion_report.json"} <= keys
    remote_report = client.get_object(Bucket="soho-test", Key="coco/val2014/conversion_report.json")
    assert json.loads(remote_report["Body"].read()) == report
    dataset = StreamingDataset(
        remote="s3://soho-test/coco/val2014",
        local=str(tmp_path / "cache"),
        shuffle=False,
        batch_size=1,
    )
    assert len(dataset) == report["written"] == 200
    assert dataset[199]["image_id"] == "500200"

    with pytest.raises(DataError, match="no-such-bucket"):
        convert_coco(
            str(synthetic_world / "coco/annotations/captions_val2014.json"),
            str(synthetic_world / "coco/val2014"),
            "s3://no-such-bucket/coco",
        )
