"""The results report: one row per (task, dataset, split, protocol, metric), beside chance and the
paper's number for the same protocol."""

import csv
import json
import math

import pytest
from mlflow.tracking import MlflowClient

from soho_scale.report import RETRIEVAL_METRICS, chance_params, report

CHANCE = {
    "vqa": {"accuracy": 0.22, "question_type_prior_accuracy": 0.45},
    "nlvr2": {"dev": 0.6},
    "snli_ve": {"dev": 1 / 3, "text_prior": {"dev": 0.7}},
    "retrieval": {
        "text_retrieval": {"r1": 0.01, "r5": 0.05, "r10": 0.1},
        "image_retrieval": {"r1": 0.01, "r5": 0.05, "r10": 0.1},
    },
}


def _store(tmp_path, evals: list[tuple[str, str, str, dict, dict]]) -> str:
    """An MLflow store with a pipeline parent (chance params) and the given eval runs:
    (task, dataset, split, metrics, extra tags)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("exp")
    parent = client.create_run(experiment, run_name="pipeline").info.run_id
    for key, value in chance_params(CHANCE).items():
        client.log_param(parent, key, value)
    for task, dataset, split, metrics, tags in evals:
        tags = {"task": task, "dataset": dataset, "split": split, **tags}
        run = client.create_run(experiment, tags=tags).info.run_id
        for metric, value in metrics.items():
            client.log_metric(run, f"{split}_{metric}", value)
    return uri


def _rows(tmp_path) -> dict[tuple, dict]:
    with open(tmp_path / "out" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["task", "dataset", "split", "protocol", "metric", "value",
                              "submission", "chance", "paper"]  # fmt: skip
    return {(r["task"], r["dataset"], r["split"], r["protocol"], r["metric"]): r for r in table}


def test_report_has_every_task_with_chance_and_paper(tmp_path):
    retrieval = {**{m: 30.0 for m in RETRIEVAL_METRICS}, "two_stage_ir_r5": 40.0,
                 "first_stage_ir_r5": 35.0, "num_images": 100}  # fmt: skip
    uri = _store(tmp_path, [
        ("vqa", "VQA v2", "val2014", {"vqa_accuracy": 51.0}, {}),
        ("nlvr2", "NLVR2", "dev", {"accuracy": 70.0}, {}),
        ("snli_ve", "SNLI-VE", "dev", {"accuracy": 60.0}, {}),
        ("retrieval", "MSCOCO", "test", retrieval, {}),
    ])  # fmt: skip
    rows, files = report("exp", str(tmp_path / "out"), tracking_uri=uri)
    by_key = _rows(tmp_path)
    # VQA's val accuracy is a row of its own: SOHO publishes test-dev and test-std only
    vqa = by_key["vqa", "VQA v2", "val2014", "val", "vqa_accuracy"]
    assert (float(vqa["value"]), float(vqa["chance"])) == (51.0, 22.0)
    assert math.isnan(float(vqa["paper"]))
    assert float(by_key["nlvr2", "NLVR2", "dev", "dev", "accuracy"]["paper"]) == 76.37
    assert float(by_key["snli_ve", "SNLI-VE", "dev", "val", "accuracy"]["paper"]) == 85.0
    # 100 test images are neither the 5K nor a 1K protocol: no published number beside them
    ir5 = by_key["retrieval", "MSCOCO", "test", "100 images", "ir_r5"]
    assert float(ir5["chance"]) == 5.0 and math.isnan(float(ir5["paper"]))
    # A two-stage evaluation gets its own rows (chance of the metric it ranks by).
    two_stage = by_key["retrieval", "MSCOCO", "test", "100 images", "two_stage_ir_r5"]
    assert (float(two_stage["value"]), float(two_stage["chance"])) == (40.0, 5.0)
    assert ("retrieval", "MSCOCO", "test", "100 images", "two_stage_tr_r5") not in by_key
    first_stage = by_key["retrieval", "MSCOCO", "test", "100 images", "first_stage_ir_r5"]
    assert float(first_stage["value"]) == 35.0
    assert (tmp_path / "out" / "results.png").stat().st_size > 1000
    markdown = (tmp_path / "out" / "results.md").read_text()
    # chance, then what the text alone scores (when known), then the paper
    assert (
        "| snli_ve | SNLI-VE | val | accuracy | 60.00 (dev) | 33.33 | 70.00 | 85.00 |" in markdown
    )
    assert "| vqa | VQA v2 | val | vqa_accuracy | 51.00 (val2014) | 22.00 | 45.00 | - |" in markdown
    assert "| nlvr2 | NLVR2 | dev | accuracy | 70.00 (dev) | 60.00 | - | 76.37 |" in markdown
    json.dumps(rows)  # plain data


def test_every_published_protocol_is_its_own_row(tmp_path):
    coco = {**{m: 40.0 for m in RETRIEVAL_METRICS}, **{f"fold_{m}": 60.0 for m in RETRIEVAL_METRICS},
            "num_images": 5000}  # fmt: skip
    f30k = {**{m: 70.0 for m in RETRIEVAL_METRICS}, "two_stage_ir_r5": 75.0,
            "first_stage_ir_r5": 65.0, "num_images": 1000}  # fmt: skip
    uri = _store(tmp_path, [
        ("vqa", "VQA v2", "val2014", {"vqa_accuracy": 66.0}, {}),
        ("vqa", "VQA v2", "test-dev2015", {"num_samples": 9.0}, {"submission": "/r/vqa_test-dev2015_submission.json"}),
        ("vqa", "VQA v2", "test2015", {"num_samples": 9.0}, {"submission": "/r/vqa_test2015_submission.json"}),
        ("nlvr2", "NLVR2", "dev", {"accuracy": 70.0}, {}),
        ("nlvr2", "NLVR2", "test1", {"accuracy": 71.0}, {}),
        ("nlvr2", "NLVR2", "test2", {"accuracy": 72.0}, {}),
        ("snli_ve", "SNLI-VE", "dev", {"accuracy": 80.0}, {}),
        ("snli_ve", "SNLI-VE", "test", {"accuracy": 81.0}, {}),
        ("retrieval", "MSCOCO", "test", coco, {}),
        ("retrieval", "Flickr30K", "test", f30k, {}),
    ])  # fmt: skip
    report("exp", str(tmp_path / "out"), tracking_uri=uri)
    by_key = _rows(tmp_path)
    protocols = {(k[1], k[3]) for k in by_key}
    assert protocols == {("VQA v2", "val"), ("VQA v2", "test-dev"), ("VQA v2", "test-std"),
                         ("NLVR2", "dev"), ("NLVR2", "test-P"), ("NLVR2", "test-U"),
                         ("SNLI-VE", "val"), ("SNLI-VE", "test"), ("MSCOCO", "5K"),
                         ("MSCOCO", "1K"), ("Flickr30K", "1K")}  # fmt: skip
    # COCO and Flickr30K retrieval do not collide; each sits beside its own published number
    assert float(by_key["retrieval", "MSCOCO", "test", "5K", "tr_r1"]["paper"]) == 66.4
    assert float(by_key["retrieval", "MSCOCO", "test", "1K", "tr_r1"]["value"]) == 60.0  # folds
    assert float(by_key["retrieval", "MSCOCO", "test", "1K", "tr_r1"]["paper"]) == 85.1
    assert float(by_key["retrieval", "Flickr30K", "test", "1K", "ir_r10"]["paper"]) == 96.1
    assert float(by_key["retrieval", "Flickr30K", "test", "1K", "ir_r10"]["value"]) == 70.0
    # two-stage ranking estimates the paper's exact one; its first stage alone (contrastive
    # features) is not in SOHO
    two_stage = by_key["retrieval", "Flickr30K", "test", "1K", "two_stage_ir_r5"]
    assert (float(two_stage["value"]), float(two_stage["paper"])) == (75.0, 92.7)
    assert math.isnan(
        float(by_key["retrieval", "Flickr30K", "test", "1K", "first_stage_ir_r5"]["paper"])
    )
    assert float(by_key["nlvr2", "NLVR2", "test1", "test-P", "accuracy"]["paper"]) == 77.32
    assert float(by_key["snli_ve", "SNLI-VE", "test", "test", "accuracy"]["paper"]) == 84.95
    # the VQA test splits are scored by the server: the rows name the file to submit, and the
    # val accuracy is not placed in the test-dev row
    dev = by_key["vqa", "VQA v2", "test-dev2015", "test-dev", "vqa_accuracy"]
    assert dev["submission"] == "/r/vqa_test-dev2015_submission.json" and math.isnan(
        float(dev["value"])
    )
    assert ("vqa", "VQA v2", "val2014", "test-dev", "vqa_accuracy") not in by_key
    assert math.isnan(float(by_key["vqa", "VQA v2", "val2014", "val", "vqa_accuracy"]["paper"]))
    # NLVR2's hidden test-U is not a protocol SOHO reports
    assert math.isnan(float(by_key["nlvr2", "NLVR2", "test2", "test-U", "accuracy"]["paper"]))
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert (
        "| vqa | VQA v2 | test-std | vqa_accuracy | submit /r/vqa_test2015_submission.json |"
        in markdown
    )
    assert len(markdown.splitlines()) == 2 + len(by_key)


def test_whole_5k_test_set_is_the_5k_protocol_also_short_of_an_image(tmp_path):
    """`eval.retrieval_folds: 1` on the 5K test set, one image lost at conversion: its numbers
    sit beside the paper's 5K ones, not the 1K ones."""
    whole = {**{m: 40.0 for m in RETRIEVAL_METRICS}, "num_images": 4999, "num_images_skipped": 1}
    uri = _store(tmp_path, [("retrieval", "MSCOCO", "test", whole, {})])
    report("exp", str(tmp_path / "out"), tracking_uri=uri)
    assert {k[3] for k in _rows(tmp_path)} == {"5K"}


@pytest.mark.parametrize(
    ("dataset", "metrics", "expected"),
    [
        ("MSCOCO", {"num_images": 2000}, {"2000 images"}),
        ("Flickr30K", {"num_images": 999, "num_images_skipped": 1}, {"1K"}),  # short of one
        ("MSCOCO", {"num_images": 1000}, {"1000 images"}),  # not the mean of the 5K set's folds
        ("MSCOCO", {"num_images": 100, "num_folds": 5}, {"100 images", "5 folds of 20"}),
        ("MSCOCO", {"num_images": 4999, "num_images_skipped": 1, "num_folds": 5}, {"5K", "1K"}),
        ("MSCOCO", {"num_images": 2000, "num_folds": 2}, {"2000 images", "2 folds of 1000"}),
        ("Flickr30K", {"num_images": 5000}, {"5000 images"}),
    ],
)
def test_retrieval_protocol_follows_the_test_sets_size(tmp_path, dataset, metrics, expected):
    """Only the published test sets' sizes sit beside the paper's 5K / 1K numbers; a set of
    another size (a subset, the synthetic world) is named by its count and compared with none."""
    values = {m: 40.0 for m in RETRIEVAL_METRICS}
    if "num_folds" in metrics:
        values.update({f"fold_{m}": 60.0 for m in RETRIEVAL_METRICS})
    uri = _store(tmp_path, [("retrieval", dataset, "test", {**values, **metrics}, {})])
    report("exp", str(tmp_path / "out"), tracking_uri=uri)
    rows = _rows(tmp_path)
    assert {k[3] for k in rows} == expected
    for key, row in rows.items():
        published = key[3] in ("5K", "1K")
        assert math.isnan(float(row["paper"])) is not published, key


def test_report_reads_the_pipelines_own_store_by_default(tmp_path, monkeypatch):
    run_root = tmp_path / "runs" / "pipe"
    run_root.mkdir(parents=True)
    _store(run_root, [("nlvr2", "NLVR2", "dev", {"accuracy": 70.0}, {})])
    (tmp_path / "runs" / "other").mkdir()
    MlflowClient(f"sqlite:///{tmp_path}/runs/other/mlflow.db").create_experiment("another")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rows, _ = report("exp", str(tmp_path / "out"))
    assert [r["value"] for r in rows] == [70.0]
    with pytest.raises(ValueError, match="pass --tracking-uri"):
        report("nowhere", str(tmp_path / "out2"))


def test_report_of_one_pipeline_among_several_in_one_experiment(tmp_path):
    """A sweep's pipelines share an experiment: each one's report holds its own evaluations (the
    children of its training runs, themselves children of its parent run) only."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep")
    parents = []
    for accuracy in (60.0, 70.0):
        parent = client.create_run(experiment, run_name="pipeline").info.run_id
        train = client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
        tags = {"task": "nlvr2", "dataset": "NLVR2", "split": "dev", "mlflow.parentRunId": train}
        run = client.create_run(experiment, tags=tags).info.run_id
        client.log_metric(run, "dev_accuracy", accuracy)
        parents.append(parent)
    for parent, accuracy in zip(parents, (60.0, 70.0)):
        rows, _ = report("sweep", str(tmp_path / parent), uri, parent_run_id=parent)
        assert [r["value"] for r in rows] == [accuracy]
    rows, _ = report("sweep", str(tmp_path / "all"), uri)  # no filter: the newest evaluation
    assert len(rows) == 1


def test_an_evaluation_an_older_version_logged_without_a_dataset_tag_is_reported(tmp_path):
    # A run folder evaluated before evaluations tagged their dataset (a re-run of `make demo`
    # whose stages are all done reports them again).
    uri = _store(tmp_path, [("nlvr2", "NLVR2", "dev", {"accuracy": 70.0}, {})])
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("exp").experiment_id
    old = client.create_run(experiment, tags={"task": "vqa", "split": "val2014"}).info.run_id
    client.log_metric(old, "val2014_vqa_accuracy", 51.0)
    report("exp", str(tmp_path / "out"), tracking_uri=uri)
    by_key = _rows(tmp_path)
    assert float(by_key["vqa", "unknown", "val2014", "val", "vqa_accuracy"]["value"]) == 51.0
    assert float(by_key["nlvr2", "NLVR2", "dev", "dev", "accuracy"]["value"]) == 70.0
