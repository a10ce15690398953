"""The paper's path rehearsed on one CPU: every published dataset format -> the real converters ->
shards on a local S3 server at the URLs the paper jobs name -> the real paper pipeline
(jobs/pipelines/soho_r101_l12.yaml) shrunk by its documented override set -> a report with a row
for every protocol it evaluates and VQA test-dev and test-std submissions the server's format
rules accept.
A plumbing test: it fails when a stage, a hand-off or a row is missing, not on accuracy."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_pipeline.loopback import LocalS3Server
from data_pipeline.synthetic import write_world
from soho_scale.tasks.vqa import submission_problems

REPO = Path(__file__).resolve().parent.parent
PIPELINE = "jobs/pipelines/soho_r101_l12.yaml"
OVERRIDE_SET = "jobs/pipelines/override_sets/rehearsal_cpu.yaml"
S3 = "s3://soho-data"

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _test_questions(world: Path, root: Path) -> dict[str, Path]:
    """VQA v2 test2015 and its part test-dev2015 as published: questions only (no annotations
    file exists), over COCO test2015 image names. {split: questions file}."""
    questions = json.loads((world / "vqa/v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    images = root / "test2015"
    images.mkdir()
    for path in (world / "coco/val2014").iterdir():
        number = int(path.stem.rsplit("_", 1)[-1])
        shutil.copy(path, images / f"COCO_test2015_{number:012d}.jpg")
    files = {}
    for split, part in (("test2015", questions["questions"]),
                        ("test-dev2015", questions["questions"][::2])):  # fmt: skip
        files[split] = root / f"v2_OpenEnded_mscoco_{split}_questions.json"
        files[split].write_text(json.dumps({**questions, "data_subtype": split, "questions": part}))
    return files


def _flickr30k(world: Path, root: Path) -> tuple[Path, Path]:
    """A Karpathy `dataset_flickr30k.json` (no `filepath`, images in one folder) over the
    synthetic COCO images and captions."""
    karpathy = json.loads((world / "karpathy/dataset_coco.json").read_text())
    images = root / "flickr30k_images"
    images.mkdir()
    entries = []
    for i, image in enumerate(karpathy["images"]):
        name = f"{1000 + i}.jpg"
        shutil.copy(world / "coco" / image["filepath"] / image["filename"], images / name)
        split = "test" if image["split"] == "test" else "train"
        entries.append({"filename": name, "imgid": i, "split": split,
                        "sentences": image["sentences"]})  # fmt: skip
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return path, images


def _convert_everything(world: Path, root: Path) -> dict[str, list[int]]:
    """Every shard set the paper jobs read, with the real converters; returns the question ids
    of VQA's test splits."""
    from data_pipeline.sources.coco import convert_coco
    from data_pipeline.sources.karpathy import convert_karpathy
    from data_pipeline.sources.nlvr2 import convert_nlvr2
    from data_pipeline.sources.snli_ve import convert_snli_ve
    from data_pipeline.sources.vg import convert_vg
    from data_pipeline.sources.vqa import convert_vqa

    def w(*parts: str) -> str:
        return str(world.joinpath(*parts))

    # Pre-training data without the retrieval val/test images, as the README converts it.
    flickr, flickr_images = _flickr30k(world, root)
    held_out = [w("karpathy/dataset_coco.json"), str(flickr)]
    for split in ("train2014", "val2014"):
        convert_coco(w(f"coco/annotations/captions_{split}.json"), w(f"coco/{split}"),
                     f"{S3}/coco/{split}", exclude=held_out)  # fmt: skip
    convert_vg(w("vg/region_descriptions.json"), w("vg/image_data.json"), w("vg"), f"{S3}/vg",
               exclude=held_out)  # fmt: skip
    convert_vqa(w("vqa/v2_OpenEnded_mscoco_train2014_questions.json"),
                w("vqa/v2_mscoco_train2014_annotations.json"), w("coco/train2014"),
                f"{S3}/vqa/train2014", min_answer_count=1)  # fmt: skip
    vocab_file = root / "answer_vocab.json"
    from data_pipeline.storage import read_bytes

    vocab_file.write_bytes(read_bytes(f"{S3}/vqa/train2014/answer_vocab.json"))
    vocab = json.loads(vocab_file.read_text())
    convert_vqa(w("vqa/v2_OpenEnded_mscoco_val2014_questions.json"),
                w("vqa/v2_mscoco_val2014_annotations.json"), w("coco/val2014"),
                f"{S3}/vqa/val2014", answer_vocab=vocab)  # fmt: skip
    test_questions = _test_questions(world, root)
    for split, questions in test_questions.items():
        convert_vqa(str(questions), None, str(root / "test2015"), f"{S3}/vqa/{split}",
                    answer_vocab=vocab)  # fmt: skip
    for split in ("train", "dev", "test1"):
        convert_nlvr2(w(f"nlvr2/data/{split}.json"), w(f"nlvr2/images/{split}"),
                      f"{S3}/nlvr2/{split}")  # fmt: skip
    for split, name in (("train,restval", "train"), ("test", "test")):
        convert_karpathy(w("karpathy/dataset_coco.json"), w("coco"), f"{S3}/karpathy/{name}",
                         split=split)  # fmt: skip
    for split in ("train", "test"):
        convert_karpathy(str(flickr), str(flickr_images), f"{S3}/flickr30k/{split}", split=split)
    for split in ("train", "dev", "test"):
        convert_snli_ve(w(f"snli_ve/snli_ve_{split}.jsonl"), w("snli_ve/flickr30k_images"),
                        f"{S3}/snli_ve/{split}")  # fmt: skip
    return {
        split: [q["question_id"] for q in json.loads(path.read_text())["questions"]]
        for split, path in test_questions.items()
    }


def test_the_paper_pipeline_runs_end_to_end_on_every_published_format(tmp_path):
    world = tmp_path / "world"
    write_world(str(world), seed=0, size="small")
    run_root = tmp_path / "run"
    with LocalS3Server(["soho-data", "soho-checkpoints"]):
        question_ids = _convert_everything(world, tmp_path)
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        result = subprocess.run(
            [sys.executable, "-m", "soho_scale.cli", "pipeline", PIPELINE,
             "--override-set", OVERRIDE_SET, "--run-root", str(run_root)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    # every stage ran, and each fine-tune started from the pre-training stage's export
    stages = [s["name"] for s in yaml.safe_load((REPO / PIPELINE).read_text())["stages"]]
    assert len(stages) == 14
    for stage in stages:
        assert (run_root / stage / "stage_done.json").exists(), stage
    export = run_root / "pretrain" / "export" / "model.pt"
    for stage in ("vqa", "nlvr2", "retrieval_coco", "retrieval_f30k", "snli_ve"):
        log = (run_root / stage / "stage.log").read_text()
        assert f"model.init_from={export}" in log and "init_from {" in log, stage

    # the report: every protocol the paper pipeline evaluates, each beside the paper's number of
    # that protocol; the small retrieval test sets (the 5K and 1K protocols at full size, unit
    # tested in test_report.py) are named by their size and compared with no published number
    with open(run_root / "report" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    karpathy = json.loads((world / "karpathy/dataset_coco.json").read_text())["images"]
    test_images = sum(image["split"] == "test" for image in karpathy)
    retrieval = {("MSCOCO", f"{test_images} images"),
                 ("MSCOCO", f"5 folds of {test_images // 5}"),  # MSCOCO's 1K protocol at 5000
                 ("Flickr30K", f"{test_images} images")}  # fmt: skip
    keys = {(r["dataset"], r["protocol"]) for r in rows}
    assert keys == {("VQA v2", "test-dev"), ("VQA v2", "test-std"), ("NLVR2", "dev"),
                    ("NLVR2", "test-P"), ("SNLI-VE", "val"), ("SNLI-VE", "test"),
                    *retrieval}  # fmt: skip
    for dataset, protocol in retrieval:
        metrics = {r["metric"] for r in rows
                   if (r["dataset"], r["protocol"]) == (dataset, protocol)}  # fmt: skip
        assert {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"} <= metrics
    for row in rows:
        small = (row["dataset"], row["protocol"]) in retrieval
        assert math.isnan(float(row["paper"])) is small, row
        assert row["submission"] or not math.isnan(float(row["value"])), row

    # the pipeline's parent run carries the results, so pipelines compare in MLflow's charts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_root}/mlflow.db")
    with open(run_root / "tracking.json") as f:
        parent = client.get_run(json.load(f)["run_id"])
    assert parent.info.status == "FINISHED"
    for row in rows:
        if not row["submission"]:
            key = f"{row['task']}.{row['dataset']}.{row['protocol']}.{row['metric']}"
            assert parent.data.metrics[key] == pytest.approx(float(row["value"])), key

    # the VQA test rows name files the challenge server accepts: every question of the split once
    vqa = {r["split"]: r for r in rows if r["dataset"] == "VQA v2"}
    assert sorted(vqa) == sorted(question_ids) == ["test-dev2015", "test2015"]
    for split, row in vqa.items():
        assert row["submission"].endswith(f"vqa_{split}_submission.json")
        submission = json.loads(Path(row["submission"]).read_text())
        assert submission_problems(submission, question_ids[split]) == []
        assert f"submit {row['submission']}" in (run_root / "report" / "results.md").read_text()
