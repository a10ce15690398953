"""`soho-scale report --experiment NAME [--out DIR]`: the results table of an experiment.

Reads the evaluation runs of an MLflow experiment (runs tagged `task`, `dataset` and `split`, as
`soho-scale eval` logs them), keeps the newest per (task, dataset, split), and writes one row per
(task, dataset, split, protocol, metric) to `results.md`, `results.csv` (percent) and
`results.png` (one panel per task), beside the published SOHO number of the same protocol
(the SOHO paper, CVPR 2021) and the dataset's chance level (params `chance.*` of the pipeline's
parent run, when the pipeline was given a chance file); the Markdown table also shows what the
text alone scores, where the chance file has it. The store is the pipeline's own (`<run_root>/mlflow.db`) unless
--tracking-uri or MLFLOW_TRACKING_URI says otherwise.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from typing import Any

# Published SOHO results (ResNet-101 + 12 layers; the paper's tables), in percent, by (task,
# dataset, protocol) and metric. A result is placed beside the number of the same protocol only.
RETRIEVAL_METRICS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")
PAPER: dict[tuple[str, str, str], dict[str, float]] = {
    ("vqa", "VQA v2", "test-dev"): {"vqa_accuracy": 73.25},
    ("vqa", "VQA v2", "test-std"): {"vqa_accuracy": 73.47},
    ("nlvr2", "NLVR2", "dev"): {"accuracy": 76.37},
    ("nlvr2", "NLVR2", "test-P"): {"accuracy": 77.32},
    ("snli_ve", "SNLI-VE", "val"): {"accuracy": 85.00},
    ("snli_ve", "SNLI-VE", "test"): {"accuracy": 84.95},
    ("retrieval", "MSCOCO", "5K"): dict(
        zip(RETRIEVAL_METRICS, (66.4, 88.2, 93.8, 50.6, 78.0, 86.7))
    ),
    ("retrieval", "MSCOCO", "1K"): dict(
        zip(RETRIEVAL_METRICS, (85.1, 97.4, 99.4, 73.5, 94.5, 97.5))
    ),
    ("retrieval", "Flickr30K", "1K"): dict(
        zip(RETRIEVAL_METRICS, (86.5, 98.1, 99.3, 72.5, 92.7, 96.1))
    ),
}
# Retrieval protocols by dataset and the test set's image count: the whole set ranked at once.
RETRIEVAL_SETS = {("MSCOCO", 5000): "5K", ("Flickr30K", 1000): "1K"}
TASK_METRICS = {
    "vqa": ("vqa_accuracy",),
    "nlvr2": ("accuracy",),
    "snli_ve": ("accuracy",),
    "retrieval": RETRIEVAL_METRICS,
}
TASK_ORDER = ("vqa", "nlvr2", "retrieval", "snli_ve")


def protocols(
    task: str, split: str, metrics: dict[str, float], dataset: str
) -> list[tuple[str, str]]:
    """(protocol, metric-name prefix) pairs an eval run of `split` reports: VQA's test-dev2015 /
    test2015 are the server's test-dev / test-std (a submission file), and its val is a row of
    its own (SOHO publishes no val number); NLVR2 test1 is test-P (test2 the unpublished
    test-U); SNLI-VE dev is its val. Retrieval on MSCOCO's test set of 5000 images (counting
    images lost at conversion) is the 5K protocol and the mean of its five folds (`fold_`,
    `eval.retrieval_folds`) the 1K one; Flickr30K's test set of 1000 images is its 1K protocol.
    A set of another size is a protocol of its own, named by its count (`100 images`, `5 folds
    of 20`): no published number is placed beside it."""
    if task == "vqa":
        if "test-dev" in split:
            return [("test-dev", "")]
        return [("test-std" if split.startswith("test") else "val", "")]
    if task == "nlvr2":
        return [
            ("test-U" if split == "test2" else "test-P" if split.startswith("test") else split, "")
        ]
    if task == "snli_ve":
        return [("val" if split in ("dev", "val") else split, "")]
    images = round(
        metrics.get(f"{split}_num_images", 0) + metrics.get(f"{split}_num_images_skipped", 0)
    )
    found = [(RETRIEVAL_SETS.get((dataset, images), f"{images} images"), "")]
    if f"{split}_fold_tr_r1" in metrics:  # e.g. MSCOCO's 5K test set and its five 1K folds
        folds = round(metrics.get(f"{split}_num_folds", 5))  # runs that did not log it: 5
        coco_1k = (dataset, images, folds) == ("MSCOCO", 5000, 5)  # on the 5K test set
        found.append(("1K" if coco_1k else f"{folds} folds of {images // max(folds, 1)}", "fold_"))
    return found


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


def _dataset(tags: dict[str, str]) -> str:
    return tags.get("dataset", "unknown")  # an evaluation by an older soho_scale has no tag


def _newest_runs(runs: list[Any]) -> list[Any]:
    """The newest eval run per (task, dataset, split): COCO and Flickr30K never collide."""
    newest: dict[tuple[str, str, str], Any] = {}
    for run in runs:  # newest first
        tags = run.data.tags
        task, split = tags.get("task"), tags.get("split")
        key = (task, _dataset(tags), split)
        if task in TASK_METRICS and split and key not in newest:
            if run.data.metrics or tags.get("submission"):
                newest[key] = run
    return sorted(newest.values(), key=lambda r: TASK_ORDER.index(r.data.tags["task"]))


def _under(runs: list[Any], root: str) -> list[Any]:
    """The runs of `runs` that are `root` or descend from it (an evaluation is the child of its
    training stage's run, itself the child of the pipeline's parent run)."""
    parent_of = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in runs}

    def inside(run_id: str | None) -> bool:
        seen = set()
        while run_id and run_id not in seen:
            if run_id == root:
                return True
            seen.add(run_id)
            run_id = parent_of.get(run_id)
        return False

    return [r for r in runs if inside(r.info.run_id)]


def collect(
    client,  # noqa: ANN001
    experiment: str,
    parent_run_id: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Rows keyed by (task, dataset, split, protocol, metric) of the newest eval runs (only those
    under the run `parent_run_id`, when given), and the chance levels of the experiment (of that
    run)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"--experiment {experiment!r}: no such MLflow experiment")
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"])
    if parent_run_id:
        runs = _under(runs, parent_run_id)
    chance: dict[str, float] = {}
    for run in runs:
        for key, value in run.data.params.items():
            if key.startswith("chance.") and key not in chance:
                chance[key] = float(value)
    rows = []
    for run in _newest_runs(runs):
        task, split = run.data.tags["task"], run.data.tags["split"]
        dataset = _dataset(run.data.tags)
        submission = run.data.tags.get("submission", "") if split.startswith("test") else ""
        for protocol, prefix in protocols(task, split, run.data.metrics, dataset):
            paper = PAPER.get((task, dataset, protocol), {})
            # Retrieval's whole-set evaluation also ranks two-stage (ITM over the first stage's
            # top k, an estimate of the paper's ranking) and by its first stage alone (the
            # contrastive features, not in SOHO: no published number).
            ranked = (
                ("", "two_stage_", "first_stage_") if task == "retrieval" and not prefix else ("",)
            )
            for ranking in ranked:
                for metric in TASK_METRICS[task]:
                    value = run.data.metrics.get(f"{split}_{prefix}{ranking}{metric}")
                    if value is None and not (submission and not ranking):
                        continue
                    rows.append(
                        {
                            "task": task,
                            "dataset": dataset,
                            "split": split,
                            "protocol": protocol,
                            "metric": ranking + metric,
                            "value": math.nan if value is None else round(value, 2),
                            "submission": submission,
                            "chance": round(chance.get(f"chance.{task}.{metric}", math.nan), 2),
                            "text_prior": round(
                                chance.get(f"chance.{task}.{metric}.text_prior", math.nan), 2
                            ),
                            "paper": math.nan
                            if ranking == "first_stage_"
                            else paper.get(metric, math.nan),
                            "images": int(run.data.metrics.get(f"{split}_num_images", 0)),
                            "run_id": run.info.run_id,
                        }
                    )
    return rows, chance


CSV_COLUMNS = ["task", "dataset", "split", "protocol", "metric", "value", "submission",
               "chance", "paper"]  # fmt: skip


def write_report(rows: list[dict[str, Any]], out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "results.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_COLUMNS})
    md_path = os.path.join(out, "results.md")
    with open(md_path, "w") as f:
        f.write(markdown_table(rows) + "\n")
    png_path = os.path.join(out, "results.png")
    _chart(rows, png_path)
    return [md_path, csv_path, png_path]


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per (task, dataset, split, protocol, metric). Chance is the majority label;
    "text only" what the text alone scores (a per-template majority label, when the chance file
    has it): a result above it owes something to the image. A VQA test split has no answers:
    its row names the file to submit to the challenge server."""
    lines = [
        "| task | dataset | protocol | metric | ours (split) | chance | text only | SOHO paper |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        where = r["split"] + (f", {r['images']} images" if r.get("images") else "")
        ours = (
            f"submit {r['submission']}" if r["submission"] else f"{_percent(r['value'])} ({where})"
        )
        lines.append(
            f"| {r['task']} | {r['dataset']} | {r['protocol']} | {r['metric']} | {ours} | "
            f"{_percent(r['chance'])} | {_percent(r['text_prior'])} | {_percent(r['paper'])} |"
        )
    return "\n".join(lines)


def _chart(rows: list[dict[str, Any]], path: str) -> None:
    """One panel per task: ours, chance and the paper for each protocol and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASK_ORDER if any(r["task"] == t and not r["submission"] for r in rows)]
    groups = {t: [r for r in rows if r["task"] == t and not r["submission"]] for t in tasks}
    widths = [max(2, len(groups[t])) for t in tasks]  # every metric the same width
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(max(5.0, 0.45 * sum(widths) + 1.5), 5.5), squeeze=False,
        sharey=True, gridspec_kw={"width_ratios": widths},
    )  # fmt: skip
    for ax, task in zip(axes[0], tasks):
        mine = groups[task]
        labels = [f"{r['dataset']} {r['protocol']} ({r['split']}) {r['metric']}" for r in mine]
        x = range(len(mine))
        width = 0.27
        for offset, key, label in ((-width, "value", "ours"), (0, "chance", "chance"),
                                   (width, "paper", "SOHO paper")):  # fmt: skip
            values = [0 if math.isnan(r[key]) else r[key] for r in mine]
            ax.bar([i + offset for i in x], values, width, label=label)
        ax.set_xticks(list(x), labels, fontsize=7, rotation=90)
        ax.set_title(task)
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("percent")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("soho_scale vs chance and the published SOHO number of the same protocol, if any")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def find_store(experiment: str, root: str = "runs") -> str:
    """The tracking URI of the one `<root>/*/mlflow.db` holding `experiment` (each pipeline
    keeps its own store in its run_root)."""
    import glob

    from mlflow.tracking import MlflowClient

    holding = []
    for path in sorted(glob.glob(os.path.join(root, "*", "mlflow.db"))):
        uri = f"sqlite:///{os.path.abspath(path)}"
        if MlflowClient(uri).get_experiment_by_name(experiment) is not None:
            holding.append(uri)
    if len(holding) != 1:
        where = ", ".join(holding) if holding else f"no {root}/*/mlflow.db holds it"
        raise ValueError(
            f"--experiment {experiment!r}: pass --tracking-uri (MLFLOW_TRACKING_URI unset; {where})"
        )
    return holding[0]


def report(
    experiment: str, out: str, tracking_uri: str | None = None, parent_run_id: str | None = None
) -> tuple[list, list[str]]:
    """The results of `experiment` (of the pipeline whose parent run is `parent_run_id`, when
    given) written to `out`: (rows, files)."""
    from mlflow.tracking import MlflowClient

    from soho_scale.engine.tracking import without_credentials

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or find_store(experiment)
    from mlflow.exceptions import MlflowException

    from soho_scale.secrets import redact

    client = MlflowClient(without_credentials(uri))
    try:
        rows, _ = collect(client, experiment, parent_run_id)
    except MlflowException as e:
        first = (str(e).splitlines() or [""])[0][:300]
        raise ValueError(redact(f"MLflow at {uri}: {first}")) from None
    if not rows:
        raise ValueError(f"--experiment {experiment!r}: no evaluation runs (tagged task/split) yet")
    return rows, write_report(rows, out)


def report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="soho-scale report", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--out", default="report")
    parser.add_argument(
        "--tracking-uri",
        help="default: MLFLOW_TRACKING_URI, else the one runs/*/mlflow.db holding the experiment",
    )
    args = parser.parse_args(argv)
    rows, files = report(args.experiment, args.out, args.tracking_uri)
    print(markdown_table(rows))
    print(f"report: {os.path.abspath(args.out)}")
    return 0
