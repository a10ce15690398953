"""Fixtures for the downstream-task tests: small train/eval shard folders per task, cut from the
synthetic world (seed 0) and converted with the real converters, so training and evaluation
read real MDS shards through the real streaming loader in a few seconds."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from data_pipeline.synthetic import write_world
from soho_scale.spec import Job, load_job

# (train samples, eval samples) per task: enough to learn the text priors in a few CPU steps.
SUBSETS = {"vqa": (200, 48), "nlvr2": (32, 32), "snli_ve": (240, 48)}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(str(root), seed=0, size="small")
    return root


def _lines(path: Path, count: int, out: Path) -> str:
    with open(path) as f:
        lines = f.readlines()[:count]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines))
    return str(out)


def _convert_vqa(world: Path, root: Path, subtype: str, count: int, vocab: list[str]) -> str:
    from data_pipeline.sources.vqa import convert_vqa

    questions = json.loads(
        (world / "vqa" / f"v2_OpenEnded_mscoco_{subtype}_questions.json").read_text()
    )
    annotations = json.loads((world / "vqa" / f"v2_mscoco_{subtype}_annotations.json").read_text())
    questions["questions"] = questions["questions"][:count]
    kept = {q["question_id"] for q in questions["questions"]}
    annotations["annotations"] = [a for a in annotations["annotations"] if a["question_id"] in kept]
    raw = root / "raw" / subtype
    raw.mkdir(parents=True)
    (raw / "q.json").write_text(json.dumps(questions))
    (raw / "a.json").write_text(json.dumps(annotations))
    out = root / "vqa" / subtype
    convert_vqa(
        str(raw / "q.json"), str(raw / "a.json"), str(world / "coco" / subtype), str(out),
        answer_vocab=vocab, keep_unanswerable=subtype != "train2014", split=subtype,
    )  # fmt: skip
    return str(out)


@pytest.fixture(scope="session")
def task_shards(
    world: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[str, str]]:
    """{task: (train shard folder, eval shard folder)} with SUBSETS samples each."""
    from data_pipeline.sources.karpathy import convert_karpathy
    from data_pipeline.sources.nlvr2 import convert_nlvr2
    from data_pipeline.sources.snli_ve import convert_snli_ve
    from data_pipeline.sources.vqa import build_answer_vocab

    root = tmp_path_factory.mktemp("task_shards")
    train_annotations = json.loads(
        (world / "vqa" / "v2_mscoco_train2014_annotations.json").read_text()
    )["annotations"]
    vocab = build_answer_vocab(train_annotations, min_count=1)
    shards = {
        "vqa": tuple(
            _convert_vqa(world, root, subtype, count, vocab)
            for subtype, count in zip(("train2014", "val2014"), SUBSETS["vqa"])
        )
    }
    nlvr2, snli = [], []
    for split, train_or_eval in (("train", 0), ("dev", 1)):
        source = _lines(
            world / "nlvr2" / "data" / f"{split}.json",
            SUBSETS["nlvr2"][train_or_eval],
            root / "raw" / "nlvr2" / f"{split}.json",
        )
        out = str(root / "nlvr2" / split)
        convert_nlvr2(source, str(world / "nlvr2" / "images" / split), out, split=split)
        nlvr2.append(out)
        source = _lines(
            world / "snli_ve" / f"snli_ve_{split}.jsonl",
            SUBSETS["snli_ve"][train_or_eval],
            root / "raw" / "snli_ve" / f"snli_ve_{split}.jsonl",
        )
        out = str(root / "snli_ve" / split)
        convert_snli_ve(source, str(world / "snli_ve" / "flickr30k_images"), out, split=split)
        snli.append(out)
    shards["nlvr2"], shards["snli_ve"] = tuple(nlvr2), tuple(snli)
    # Retrieval: all of the small world's Karpathy split, 350 training and 100 test images.
    retrieval = []
    for name, split in (("train", "train,restval"), ("test", "test")):
        out = str(root / "karpathy" / name)
        convert_karpathy(
            str(world / "karpathy" / "dataset_coco.json"), str(world / "coco"), out, split
        )
        retrieval.append(out)
    shards["retrieval"] = tuple(retrieval)
    return shards


def demo_job(task: str, shards: dict[str, tuple[str, str]], *overrides: str) -> Job:
    """The demo job of `task` reading the test shards (no init_from: fresh tiny model)."""
    train, evaluate = shards[task]
    return load_job(
        os.path.join(REPO, "jobs", "demo", f"{task}.yaml"),
        [
            f"data.streams.0.remote={train}",
            f"eval.streams.0.remote={evaluate}",
            "model.init_from=null",
            "data.workers=0",
            *overrides,
        ],
    )


def finetune(job: Job, steps: int, lr: float | None, batch_size: int = 16):
    """(step module, untrained metrics, trained metrics): AdamW at `lr` (None: the job's
    optimizer, constant rates) on the step module for `steps` steps over the job's train
    stream, the job's evaluation before and after."""
    import torch

    from data_pipeline.loader import build_loader
    from data_pipeline.streaming import build_dataset
    from soho_scale.engine.evaluate import build_eval_loader, evaluate_task
    from soho_scale.tasks import build_task_evaluation, build_task_step, sample_processor

    torch.manual_seed(job.seed)
    step = build_task_step(job, job.model.config())
    retrieval = job.data.task == "retrieval"  # its own protocol (retrieval_eval.evaluate_job)
    evaluation = None if retrieval else build_task_evaluation(job)
    keep = () if retrieval else evaluation.keep_columns
    cache = tempfile.mkdtemp(prefix="cache-")
    _, eval_loader = build_eval_loader(job, cache, 32, keep, workers=0)
    before, _ = evaluate_task(job, step.model, eval_loader, evaluation=evaluation)
    processor = sample_processor(job)
    dataset = build_dataset(
        [job.data.streams[0].remote], processor, cache, batch_size, shuffle_seed=job.seed
    )
    loader = build_loader(dataset, batch_size, num_workers=0)
    if lr is None:  # the job's own two groups (SGD for the CNN, AdamW for the rest)
        from soho_scale.engine.optimizer import build_optimizer

        optimizer = build_optimizer(step, job.optim)
    else:
        optimizer = torch.optim.AdamW(step.parameters(), lr=lr)
    done = 0
    while done < steps:
        for batch in loader:
            loss, _ = step(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    after, _ = evaluate_task(job, step.model, eval_loader, evaluation=evaluation)
    return step, before, after
