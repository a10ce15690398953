"""`soho-scale eval` and evaluate_task: per-sample predictions gathered across ranks, batch- and
world-size-independent results, outputs and the MLflow child run; every job spec loads."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_pipeline.loopback import free_port
from soho_scale.engine.evaluate import build_eval_loader, evaluate_task
from soho_scale.launch.local import eval_main
from soho_scale.model.config import build_config
from soho_scale.model.soho import Soho
from soho_scale.spec import load_job
from soho_scale.tasks import build_task_evaluation, build_task_model
from soho_scale.tasks.visual import encode_images, fuse_texts_with_images
from tests.tasks.conftest import REPO, demo_job

TASKS = ("vqa", "nlvr2", "snli_ve")


@pytest.mark.parametrize(
    "path", sorted(glob.glob(str(REPO / "jobs" / "finetune" / "*.yaml")))
    + [str(REPO / "jobs" / "demo" / f"{t}.yaml") for t in TASKS],
)  # fmt: skip
def test_every_job_loads(path):
    job = load_job(path)
    assert job.data.task != "pretrain" and job.eval.streams


def test_batch_independent_encoding_equals_each_image_alone():
    torch.manual_seed(0)
    soho = Soho(build_config("tiny")).eval()
    sizes = torch.tensor([[64, 96], [96, 64], [64, 96], [80, 80]])
    images = torch.zeros(4, 3, 96, 96)
    for row, (h, w) in enumerate(sizes.tolist()):
        images[row, :, :h, :w] = torch.randn(3, h, w)
    text_ids = torch.randint(1000, 2000, (4, 8))
    text_mask = torch.ones(4, 8, dtype=torch.long)
    rows = torch.arange(4)
    with torch.no_grad():
        together = fuse_texts_with_images(soho, images, sizes, text_ids, text_mask, rows, True)
        padded = fuse_texts_with_images(soho, images, sizes, text_ids, text_mask, rows, False)
        for row, (h, w) in enumerate(sizes.tolist()):
            alone = fuse_texts_with_images(
                soho, images[row : row + 1, :, :h, :w], sizes[row : row + 1],
                text_ids[row : row + 1], text_mask[row : row + 1], rows[:1], False,
            )  # fmt: skip
            torch.testing.assert_close(together[row], alone[0], rtol=1e-5, atol=1e-5)
        visual = encode_images(soho, images, sizes, True)
    assert visual.mask.sum(1).tolist() == encode_images(soho, images, sizes).mask.sum(1).tolist()
    # the reason for it: padding changes the CNN's border cells of the smaller images
    assert not torch.allclose(together[1], padded[1], atol=1e-4)


def _weights(task: str, shards, folder) -> str:
    torch.manual_seed(3)
    job = demo_job(task, shards)
    path = os.path.join(folder, f"{task}.pt")
    torch.save(build_task_model(job, job.model.config()).state_dict(), path)
    return path


def _evaluate(task, shards, weights, rank, world, batch_size, cache):
    job = demo_job(task, shards)
    model = build_task_model(job, job.model.config())
    model.load_state_dict(torch.load(weights[task]))
    evaluation = build_task_evaluation(job, rank)
    _, loader = build_eval_loader(job, cache, batch_size, evaluation.keep_columns, workers=0)
    return evaluate_task(job, model, loader, rank, world, evaluation)


def _rank_main(rank, world, port, shards, weights, out):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for task in TASKS:
        metrics, predictions = _evaluate(task, shards, weights, rank, world, 4, out)
        results[task] = {"metrics": metrics, "predictions": predictions}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def broken_copy(folder: str, out: str, broken: set[int], column: str = "image") -> str:
    """The shard folder `folder` written again to `out`, the images of the samples `broken`
    replaced by bytes of the same length that are no image (as a foreign writer could store)."""
    from streaming import MDSWriter, StreamingDataset

    with open(os.path.join(folder, "index.json")) as f:
        first = json.load(f)["shards"][0]
    columns = dict(zip(first["column_names"], first["column_encodings"]))
    dataset = StreamingDataset(local=folder, shuffle=False, batch_size=1)
    with MDSWriter(out=out, columns=columns) as writer:
        for i in range(dataset.num_samples):
            sample = dataset[i]
            if i in broken:
                sample[column] = b"\x00" * len(sample[column])
            writer.write(sample)
    return out


def test_undecodable_images_are_scored_on_blank_images_and_counted(task_shards, tmp_path, caplog):
    """An eval sample whose image does not decode is scored (on the loader's blank stand-in), so
    every sample of the split has a prediction, and counted in the metrics with a warning."""
    train, dev = task_shards["snli_ve"]
    broken = {"snli_ve": (train, broken_copy(dev, str(tmp_path / "dev"), {1, 5}))}
    torch.manual_seed(0)
    job = demo_job("snli_ve", broken)
    model = build_task_model(job, job.model.config())
    results = {}
    for name, shards in (("broken", broken), ("clean", task_shards)):
        job = demo_job("snli_ve", shards)
        evaluation = build_task_evaluation(job, 0)
        cache = str(tmp_path / f"cache-{name}")
        _, loader = build_eval_loader(job, cache, 4, evaluation.keep_columns, workers=0)
        with caplog.at_level("WARNING"):
            results[name] = evaluate_task(job, model, loader, 0, 1, evaluation)
    metrics, predictions = results["broken"]
    assert metrics["num_samples"] == len(predictions) == 48
    assert metrics["num_samples_undecodable"] == 2
    assert "snli_ve: 2 samples' images did not decode" in caplog.text
    assert results["clean"][0]["num_samples_undecodable"] == 0
    assert [r["sample_id"] for r in results["clean"][1]] == [r["sample_id"] for r in predictions]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_give_exactly_the_single_rank_results(task_shards, tmp_path):
    # SNLI-VE's split with two images that do not decode: each rank counts what it read
    train, dev = task_shards["snli_ve"]
    shards = {**task_shards, "snli_ve": (train, broken_copy(dev, str(tmp_path / "dev"), {1, 5}))}
    weights = {task: _weights(task, shards, str(tmp_path)) for task in TASKS}
    single = {
        task: _evaluate(task, shards, weights, 0, 1, 16, str(tmp_path / "c1")) for task in TASKS
    }
    mp.spawn(
        _rank_main,
        args=(2, free_port(), shards, weights, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    with open(tmp_path / "rank0.json") as f:
        rank0 = json.load(f)
    with open(tmp_path / "rank1.json") as f:
        rank1 = json.load(f)
    for task in TASKS:
        metrics, predictions = single[task]
        assert rank0[task]["metrics"] == metrics, task  # exactly, not approximately
        assert rank1[task]["metrics"] == metrics, task  # every rank gets the metrics
        assert rank0[task]["predictions"] == predictions, task
        assert rank1[task]["predictions"] == []  # only rank 0 holds the records
        ids = [r["sample_id"] for r in predictions]
        assert ids == list(range(len(ids))) and metrics["num_samples"] == len(ids)
        assert metrics["num_samples_undecodable"] == (2 if task == "snli_ve" else 0), task


@pytest.mark.slow
def test_eval_command_writes_outputs_and_a_child_run(task_shards, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from soho_scale.engine.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train, dev = task_shards["vqa"]
    run_dir = tmp_path / "run"
    parent = Tracker(str(run_dir), "soho-test", "finetune")
    parent.finish()
    torch.manual_seed(0)
    job = demo_job("vqa", task_shards)
    model = build_task_model(job, job.model.config())
    export = run_dir / "export" / "model.pt"
    export.parent.mkdir(parents=True)
    torch.save(
        {"state_dict": model.state_dict(), "config": None, "task": "vqa", "step": 40}, export
    )
    out = tmp_path / "eval"
    code = eval_main(
        [
            str(REPO / "jobs" / "demo" / "vqa.yaml"),
            f"data.streams.0.remote={train}", f"eval.streams.0.remote={dev}",
            "model.init_from=null", "data.workers=0",
            "--checkpoint", str(export), "--out", str(out), "--nproc", "1",
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["checkpoint_step"] == 40 and result["split"] == "val2014"
    assert result["metrics"]["num_samples"] == 48 and 0 <= result["metrics"]["vqa_accuracy"] <= 100
    submission = json.loads((out / "vqa_val2014_submission.json").read_text())
    assert len(submission) == 48 and set(submission[0]) == {"question_id", "answer"}
    assert len(json.loads((out / "predictions.json").read_text())) == 48
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    child = MlflowClient(f"sqlite:///{run_dir}/mlflow.db").get_run(printed["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent.run_id
    assert child.data.tags["checkpoint_step"] == "40"
    assert child.data.tags["dataset_sha256"] == result["dataset_sha256"]
    assert child.data.metrics["val2014_vqa_accuracy"] == pytest.approx(
        result["metrics"]["vqa_accuracy"]
    )


def test_a_pretraining_checkpoint_is_refused_for_evaluation(task_shards, tmp_path, capsys):
    torch.manual_seed(0)
    job_file = REPO / "jobs" / "demo" / "snli_ve.yaml"
    soho = Soho(load_job(job_file).model.config())  # the job's backbone, without a task head
    path = tmp_path / "pretrain.pt"
    torch.save({"state_dict": {f"soho.{k}": v for k, v in soho.state_dict().items()}}, path)
    train, dev = task_shards["snli_ve"]
    code = eval_main(
        [
            str(job_file),
            f"data.streams.0.remote={train}", f"eval.streams.0.remote={dev}",
            "model.init_from=null", "--checkpoint", str(path), "--out", str(tmp_path / "o"),
        ]
    )  # fmt: skip
    assert code == 2
    assert "fine-tuned on snli_ve" in capsys.readouterr().err
