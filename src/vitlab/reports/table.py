"""The comparison table: which runs are best by which metric, and what varied between them.

`comparison_table` turns runs into a `Comparison` (columns and rows as data); the
other functions write it out, to the terminal (Rich), Markdown or CSV.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rich
from rich.table import Table

from vitlab.reports.runs import Run, float_or_none

DEFAULT_METRIC = "val/acc"
# The metric a run without `optimized_metric` is judged by, by its `task_name`: an eval run
# (`src/eval.py`) has no validation, only the test split.
TASK_METRICS = {"eval": "test/acc"}
THROUGHPUT = "train/samples_per_sec"
# The test loop's images/s, which an eval run logs (`conf/callbacks/eval.yaml`).
TEST_THROUGHPUT = "test/samples_per_sec"
# A run's throughput is the first of these it has: a training run's speed is its training's.
THROUGHPUTS = (THROUGHPUT, TEST_THROUGHPUT)
# Final metrics shown when at least one run has them, in this order (the sort metric first).
METRIC_COLUMNS = ("test/acc", "val/acc", "test/loss", "val/loss", "train/acc", "train/loss")


def optimized_metric(runs: Sequence[Run]) -> str:
    """The metric the sweep optimised: the runs' `optimized_metric` config key, else the
    metric of their task (`test/acc` for eval runs), else `val/acc`."""
    for run in runs:
        metric = run.config.get("optimized_metric")
        if isinstance(metric, str) and metric:
            return metric
    tasks = [run.config.get("task_name") for run in runs]
    return next((TASK_METRICS[task] for task in tasks if task in TASK_METRICS), DEFAULT_METRIC)


def throughput_of(run: Run) -> tuple[str, float] | None:
    """The run's images/s and the metric it came from (`THROUGHPUTS`, the first it has); None: none."""
    for name in THROUGHPUTS:
        value = float_or_none(run.metrics.get(name))
        if value is not None:
            return name, value
    return None


def higher_is_better(metric: str) -> bool:
    """False for losses and errors (`val/loss`), True for everything else (accuracies)."""
    return not any(word in metric for word in ("loss", "err"))


def sort_runs(runs: Sequence[Run], metric: str) -> list[Run]:
    """Best first by `metric`; runs without it after those with it; failed runs last."""

    def key(run: Run) -> tuple[bool, bool, float]:
        value = run.metrics.get(metric)
        missing = value is None or math.isnan(value)
        score = 0.0 if missing else (-value if higher_is_better(metric) else value)
        return run.failed, missing, score

    return sorted(runs, key=key)


def varied_keys(runs: Sequence[Run]) -> list[str]:
    """The override keys whose values differ between runs (a key some runs lack counts), in first-seen order."""
    keys = list(dict.fromkeys(key for run in runs for key in run.overrides))
    return [key for key in keys if len({run.overrides.get(key) for run in runs}) > 1]


@dataclass
class Comparison:
    """The comparison table as data: column names and one row (column -> value) per run."""

    columns: list[str]
    rows: list[dict[str, Any]]


def comparison_table(runs: Sequence[Run], varied: Sequence[str], metric: str) -> Comparison:
    """Rows in the order of `runs`: job, the varied keys, status, final metrics, throughput, error.

    A metric column appears when at least one run has it, `metric` always and first; the
    error column when at least one run failed with an error.
    """
    wanted = [metric, *(m for m in METRIC_COLUMNS if m != metric)]
    metrics = [m for m in wanted if m == metric or any(m in run.metrics for run in runs)]
    metrics += [name for name in THROUGHPUTS if any(name in run.metrics for run in runs)]
    errors = ["error"] if any(run.error for run in runs) else []
    columns = ["job", *varied, "status", *metrics, *errors]
    rows = [
        {
            "job": run.name,
            **{key: run.overrides.get(key) for key in varied},
            "status": run.status,
            **{m: run.metrics.get(m) for m in metrics},
            **{column: run.error for column in errors},
        }
        for run in runs
    ]
    return Comparison(columns=columns, rows=rows)


def format_value(value: Any, column: str) -> str:
    """How a cell reads: 4 decimals for metrics, 1 for throughput, blank for nothing."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if column in THROUGHPUTS else f"{value:.4f}"
    return str(value)


def print_table(table: Comparison, title: str = "Runs") -> None:
    """Print the comparison as a Rich table; failed rows in red."""
    rich_table = Table(title=title, title_justify="left")
    for column in table.columns:
        numeric = column not in ("job", "status", "error") and any(
            isinstance(row[column], float) for row in table.rows
        )
        rich_table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for row in table.rows:
        style = "red" if row["status"] == "failed" else None
        rich_table.add_row(*(format_value(row[c], c) for c in table.columns), style=style)
    rich.print(rich_table)


def to_markdown(table: Comparison) -> str:
    """The comparison as a GitHub Markdown table."""

    def cell(value: Any, column: str) -> str:
        return format_value(value, column).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(table.columns) + " |",
        "|" + "|".join("---" for _ in table.columns) + "|",
        *("| " + " | ".join(cell(row[c], c) for c in table.columns) + " |" for row in table.rows),
    ]
    return "\n".join(lines) + "\n"


def write_csv(table: Comparison, path: Path) -> None:
    """The comparison as CSV, values unrounded."""
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=table.columns)
        writer.writeheader()
        writer.writerows(table.rows)
