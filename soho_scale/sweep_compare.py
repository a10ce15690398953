"""The comparison of a sweep (`soho_scale.sweep`): per result (task, dataset, split, protocol,
metric) and variant, the mean and sample standard deviation over seeds, and for every variant
but the base the difference of means to the base with a 95% Welch t interval. Written as
`comparison.md` (one table), `comparison.csv` (one row per variant and result), `comparison.json`
and `comparison.png`."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from typing import Any

KEY = ("task", "dataset", "split", "protocol", "metric")
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; 1.96 beyond.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
MISSING = "—"
CSV_COLUMNS = [*KEY, "variant", "n", "mean", "std", "diff", "ci_lo", "ci_hi"]


def read_results(run_root: str) -> list[dict[str, Any]]:
    """The numeric rows of a pipeline's report (`<run_root>/report/results.csv`); none when the
    pipeline did not get that far."""
    path = os.path.join(run_root, "report", "results.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = [{**row, "value": float(row["value"])} for row in csv.DictReader(f)]
    return [r for r in rows if not r.get("submission") and not math.isnan(r["value"])]


def t_quantile(df: float) -> float:
    """The 97.5% quantile of t with `df` degrees of freedom, df rounded down (a wider,
    conservative interval)."""
    if df >= len(T975) + 1:
        return 1.96
    return T975[max(1, math.floor(df)) - 1]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def welch_interval(base: list[float], other: list[float]) -> tuple[float, float, float]:
    """mean(other) - mean(base) and its 95% Welch t interval (Welch-Satterthwaite degrees of
    freedom). With fewer than two values on a side the spread is unknown: the interval is NaN."""
    (mean_b, std_b), (mean_o, std_o) = mean_std(base), mean_std(other)
    diff = mean_o - mean_b
    if len(base) < 2 or len(other) < 2:
        return diff, math.nan, math.nan
    var_b, var_o = std_b**2 / len(base), std_o**2 / len(other)
    se = math.sqrt(var_b + var_o)
    if se == 0:  # every seed scored the same on both sides
        return diff, diff, diff
    df = (var_b + var_o) ** 2 / (var_b**2 / (len(base) - 1) + var_o**2 / (len(other) - 1))
    half = t_quantile(df) * se
    return diff, diff - half, diff + half


def compare(
    results: dict[tuple[str, int], list[dict[str, Any]]], variants: list[str], base: str
) -> list[dict[str, Any]]:
    """One row per result and variant (every variant for every result any pipeline has; n=0
    where the variant has none): n, mean, std, the seeds' values, and for non-base variants the
    difference to the base with its interval."""
    values: dict[tuple[str, ...], dict[str, list[tuple[int, float]]]] = {}
    for (variant, seed), rows in results.items():
        for row in rows:
            key = tuple(row[k] for k in KEY)
            values.setdefault(key, {}).setdefault(variant, []).append((seed, row["value"]))
    out = []
    for key, by_variant in values.items():
        base_values = [v for _, v in by_variant.get(base, [])]
        for variant in variants:
            seeds = sorted(by_variant.get(variant, []))
            mine = [v for _, v in seeds]
            row: dict[str, Any] = dict(zip(KEY, key))
            row.update(variant=variant, n=len(mine), seeds=[s for s, _ in seeds], values=mine)
            row["mean"], row["std"] = mean_std(mine) if mine else (math.nan, math.nan)
            row["diff"] = row["ci_lo"] = row["ci_hi"] = math.nan
            if variant != base and mine and base_values:
                row["diff"], row["ci_lo"], row["ci_hi"] = welch_interval(base_values, mine)
            out.append(row)
    return out


def _number(value: float) -> str:
    return f"{value:+.2f}"


def _cell(row: dict[str, Any]) -> str:
    return MISSING if not row["n"] else f"{row['mean']:.2f} ± {row['std']:.2f} ({row['n']})"


def _delta(row: dict[str, Any]) -> str:
    """The difference to the base and its interval; `*` when the interval excludes 0."""
    if math.isnan(row["diff"]):
        return MISSING
    if math.isnan(row["ci_lo"]):
        return f"{_number(row['diff'])} [{MISSING}]"
    significant = row["ci_lo"] > 0 or row["ci_hi"] < 0
    ci = f"[{_number(row['ci_lo'])}, {_number(row['ci_hi'])}]"
    return f"{_number(row['diff'])} {ci}{' *' if significant else ''}"


def markdown_table(rows: list[dict[str, Any]], variants: list[str], base: str) -> str:
    """One line per result: each variant's mean ± std (n seeds), then each other variant's
    difference to the base with its 95% Welch interval (`*`: the interval excludes 0; `—`: no
    value)."""
    others = [v for v in variants if v != base]
    header = [*KEY, *variants, *(f"Δ {v}" for v in others)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_key: dict[tuple[str, ...], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault(tuple(row[k] for k in KEY), {})[row["variant"]] = row
    for key, mine in by_key.items():
        cells = list(key)
        cells += [_cell(mine[v]) for v in variants]
        cells += [_delta(mine[v]) for v in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparison(
    rows: list[dict[str, Any]],
    variants: list[str],
    base: str,
    failures: list[str],
    out: str,
) -> tuple[str, list[str]]:
    """comparison.md/.csv/.json/.png in `out`; returns the Markdown table and the files."""
    os.makedirs(out, exist_ok=True)
    table = markdown_table(rows, variants, base)
    md = os.path.join(out, "comparison.md")
    with open(md, "w") as f:
        f.write(f"Base: {base}. Values in percent; Δ: difference of means to the base, ")
        f.write("[95% Welch t interval], * when it excludes 0.\n\n" + table + "\n")
        for failure in failures:
            f.write(f"\nfailed: {failure}\n")
    csv_path = os.path.join(out, "comparison.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path = os.path.join(out, "comparison.json")
    with open(json_path, "w") as f:
        clean = [{k: (None if _nan(v) else v) for k, v in row.items()} for row in rows]
        json.dump({"base": base, "variants": variants, "rows": clean, "failures": failures},
                  f, indent=2)  # fmt: skip
    png = os.path.join(out, "comparison.png")
    _chart(rows, variants, png)
    return table, [md, csv_path, json_path, png]


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _chart(rows: list[dict[str, Any]], variants: list[str], path: str) -> None:
    """One panel per result: each variant's mean with its std as error bar, its seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(tuple(r[k] for k in KEY) for r in rows))
    cols = max(1, min(4, len(keys)))
    lines = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(lines, cols, figsize=(3.2 * cols, 3.0 * lines), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        mine = {r["variant"]: r for r in rows if tuple(r[k] for k in KEY) == key}
        for x, variant in enumerate(variants):
            row = mine[variant]
            if not row["n"]:
                continue
            ax.errorbar([x], [row["mean"]], yerr=[row["std"]], fmt="o", capsize=4, color="C0")
            ax.scatter([x] * row["n"], row["values"], s=10, color="C1", zorder=3)
        ax.set_xticks(range(len(variants)), variants, fontsize=7, rotation=45)
        ax.set_xlim(-0.5, len(variants) - 0.5)
        task, dataset, _, protocol, metric = key
        ax.set_title(f"{task} {dataset} {protocol}\n{metric}", fontsize=8)
    fig.suptitle("sweep: mean ± std over seeds (dots: the seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
