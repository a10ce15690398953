"""The results report: every evaluated task, side by side with chance and the paper."""

import csv
import json

from mlflow.tracking import MlflowClient

from soho_scale.report import PAPER, chance_params, report

CHANCE = {
    "vqa": {"accuracy": 0.22, "question_type_prior_accuracy": 0.45},
    "nlvr2": {"dev": 0.6},
    "snli_ve": {"dev": 1 / 3, "text_prior": {"dev": 0.7}},
    "retrieval": {
        "text_retrieval": {"r1": 0.01, "r5": 0.05, "r10": 0.1},
        "image_retrieval": {"r1": 0.01, "r5": 0.05, "r10": 0.1},
    },
}


def test_report_has_every_task_with_chance_and_paper(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("exp")
    parent = client.create_run(experiment, run_name="pipeline").info.run_id
    for key, value in chance_params(CHANCE).items():
        client.log_param(parent, key, value)
    evals = {
        "vqa": ("val2014", {"vqa_accuracy": 51.0}),
        "nlvr2": ("dev", {"accuracy": 70.0}),
        "snli_ve": ("dev", {"accuracy": 60.0}),
        "retrieval": ("test", {**{m: 30.0 for m in PAPER["retrieval"]}, "two_stage_ir_r5": 40.0}),
    }
    for task, (split, metrics) in evals.items():
        run = client.create_run(experiment, tags={"task": task, "split": split}).info.run_id
        for metric, value in metrics.items():
            client.log_metric(run, f"{split}_{metric}", value)
    rows, files = report("exp", str(tmp_path / "out"), tracking_uri=uri)
    with open(tmp_path / "out" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["task", "metric", "value", "chance", "paper"]
    assert {r["task"] for r in table} == {"vqa", "nlvr2", "retrieval", "snli_ve"}
    by_key = {(r["task"], r["metric"]): r for r in table}
    assert float(by_key["vqa", "vqa_accuracy"]["value"]) == 51.0
    assert float(by_key["vqa", "vqa_accuracy"]["chance"]) == 22.0
    assert float(by_key["nlvr2", "accuracy"]["paper"]) == 76.37
    assert float(by_key["retrieval", "ir_r5"]["chance"]) == 5.0
    # A two-stage evaluation gets its own rows (chance and paper of the metric it ranks by).
    two_stage = by_key["retrieval", "two_stage_ir_r5"]
    assert (float(two_stage["value"]), float(two_stage["chance"])) == (40.0, 5.0)
    assert ("retrieval", "two_stage_tr_r5") not in by_key  # not evaluated, no row
    assert (tmp_path / "out" / "results.png").stat().st_size > 1000
    markdown = (tmp_path / "out" / "results.md").read_text()
    # chance, then what the text alone scores (when known), then the paper
    assert "| snli_ve | accuracy | 60.00 (dev) | 33.33 | 70.00 | 85.00 (SNLI-VE val) |" in markdown
    assert "| vqa | vqa_accuracy | 51.00 (val2014) | 22.00 | 45.00 |" in markdown
    assert "| nlvr2 | accuracy | 70.00 (dev) | 60.00 | - |" in markdown
    json.dumps(rows)  # plain data
