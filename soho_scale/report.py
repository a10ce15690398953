"""`soho-scale report --experiment NAME [--out DIR]`: the results table of an experiment.

Reads the evaluation runs of an MLflow experiment (runs tagged `task` and `split`, as
`soho-scale eval` logs them), keeps the newest per task, and writes `results.md`,
`results.csv` (columns task, metric, value, chance, paper; percent) and `results.png`, side by side
with the published SOHO numbers (SOHO.md) and the dataset's chance level (params `chance.*` of the
pipeline's parent run, when the pipeline was given a chance file); the Markdown table also shows
what the text alone scores, where the chance file has it.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from typing import Any

# Published SOHO results (ResNet-101 + 12 layers; SOHO.md), in percent, by task and metric.
PAPER = {
    "vqa": {"vqa_accuracy": (73.25, "VQA v2 test-dev")},
    "nlvr2": {"accuracy": (76.37, "NLVR2 dev")},
    "snli_ve": {"accuracy": (85.00, "SNLI-VE val")},
    "retrieval": {
        "tr_r1": (85.1, "MSCOCO 1K TR R@1"),
        "tr_r5": (97.4, "MSCOCO 1K TR R@5"),
        "tr_r10": (99.4, "MSCOCO 1K TR R@10"),
        "ir_r1": (73.5, "MSCOCO 1K IR R@1"),
        "ir_r5": (94.5, "MSCOCO 1K IR R@5"),
        "ir_r10": (97.5, "MSCOCO 1K IR R@10"),
    },
}
TASK_ORDER = ("vqa", "nlvr2", "retrieval", "snli_ve")


def chance_params(chance: dict[str, Any]) -> dict[str, float]:
    """chance.json of the synthetic world (fractions) -> {"chance.<task>.<metric>": percent}."""
    out: dict[str, float] = {}
    if "vqa" in chance:
        out["chance.vqa.vqa_accuracy"] = 100 * chance["vqa"]["accuracy"]
    if "nlvr2" in chance:
        out["chance.nlvr2.accuracy"] = 100 * chance["nlvr2"].get("dev", 0.5)
    if "snli_ve" in chance:
        out["chance.snli_ve.accuracy"] = 100 * chance["snli_ve"].get("dev", 1 / 3)
    # What the text alone scores (a per-template majority label): above it, the image counts.
    for task, metric, prior in (
        ("vqa", "vqa_accuracy", chance.get("vqa", {}).get("question_type_prior_accuracy")),
        ("nlvr2", "accuracy", chance.get("nlvr2", {}).get("text_prior", {}).get("dev")),
        ("snli_ve", "accuracy", chance.get("snli_ve", {}).get("text_prior", {}).get("dev")),
    ):
        if prior is not None:
            out[f"chance.{task}.{metric}.text_prior"] = 100 * prior
    retrieval = chance.get("retrieval", {})
    for direction, prefix in (("text_retrieval", "tr"), ("image_retrieval", "ir")):
        for k, value in retrieval.get(direction, {}).items():
            out[f"chance.retrieval.{prefix}_{k}"] = 100 * value
    return out


def collect(client, experiment: str) -> tuple[list[dict[str, Any]], dict[str, float]]:  # noqa: ANN001
    """Rows of the newest eval run per task, and the chance levels of the experiment."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"--experiment {experiment!r}: no such MLflow experiment")
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"])
    chance: dict[str, float] = {}
    for run in runs:
        for key, value in run.data.params.items():
            if key.startswith("chance.") and key not in chance:
                chance[key] = float(value)
    newest: dict[str, Any] = {}
    for run in runs:
        task, split = run.data.tags.get("task"), run.data.tags.get("split")
        if task and split and task not in newest and run.data.metrics:
            newest[task] = run
    rows = []
    for task in TASK_ORDER:
        run = newest.get(task)
        if run is None:
            continue
        split = run.data.tags["split"]
        # Retrieval: the paper's exact protocol, then (when evaluated) the two-stage ranking
        # and its first stage alone; the published number is the exact protocol's.
        prefixes = ("", "two_stage_", "first_stage_") if task == "retrieval" else ("",)
        for prefix in prefixes:
            for metric, (paper, paper_split) in PAPER[task].items():
                value = run.data.metrics.get(f"{split}_{prefix}{metric}")
                if value is None:
                    continue
                rows.append(
                    {
                        "task": task,
                        "metric": prefix + metric,
                        "value": round(value, 2),
                        "chance": round(chance.get(f"chance.{task}.{metric}", math.nan), 2),
                        "text_prior": round(
                            chance.get(f"chance.{task}.{metric}.text_prior", math.nan), 2
                        ),
                        "paper": paper,
                        "split": split,
                        "paper_split": paper_split,
                        "run_id": run.info.run_id,
                    }
                )
    return rows, chance


def write_report(rows: list[dict[str, Any]], out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "results.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["task", "metric", "value", "chance", "paper"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in writer.fieldnames})
    md_path = os.path.join(out, "results.md")
    with open(md_path, "w") as f:
        f.write(markdown_table(rows) + "\n")
    png_path = os.path.join(out, "results.png")
    _chart(rows, png_path)
    return [md_path, csv_path, png_path]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Chance is the majority label; "text only" what the text alone scores (a per-template
    majority label, when the chance file has it): a result above it owes something to the image."""
    lines = [
        "| task | metric | ours (split) | chance | text only | SOHO paper (dataset) |",
        "|---|---|---|---|---|---|",
    ]

    def percent(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.2f}"

    for r in rows:
        lines.append(
            f"| {r['task']} | {r['metric']} | {r['value']:.2f} ({r['split']}) | "
            f"{percent(r['chance'])} | {percent(r['text_prior'])} | "
            f"{r['paper']:.2f} ({r['paper_split']}) |"
        )
    return "\n".join(lines)


def _chart(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['task']}\n{r['metric']}" for r in rows]
    x = range(len(rows))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 4))
    ax.bar([i - width for i in x], [r["value"] for r in rows], width, label="ours")
    ax.bar(x, [0 if math.isnan(r["chance"]) else r["chance"] for r in rows], width, label="chance")
    ax.bar([i + width for i in x], [r["paper"] for r in rows], width, label="SOHO paper")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("percent")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("soho_scale results vs chance and the published SOHO numbers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(experiment: str, out: str, tracking_uri: str | None = None) -> tuple[list, list[str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    rows, _ = collect(client, experiment)
    if not rows:
        raise ValueError(f"--experiment {experiment!r}: no evaluation runs (tagged task/split) yet")
    return rows, write_report(rows, out)


def report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="soho-scale report", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--out", default="report")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI")
    args = parser.parse_args(argv)
    rows, files = report(args.experiment, args.out, args.tracking_uri)
    print(markdown_table(rows))
    print(f"report: {os.path.abspath(args.out)}")
    return 0
