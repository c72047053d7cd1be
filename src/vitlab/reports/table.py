"""The comparison table: which runs are best by which metric, and what varied between them.

`comparison_table` turns runs into a `Comparison` (columns and rows as data); the
other functions write it out, to the terminal (Rich), Markdown or CSV. A cell is a
value, or a `Summary` (mean ± std over the repeats of one configuration, built by
`vitlab.reports.aggregate`).

The files are complete; the terminal table is made to read at the console's width:
short column names with a legend, the error messages under the table, and transposed
(a column per job, split into several tables if need be) when it is still too wide.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

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
# Terminal names of the metrics too long for a column header (`short_names`).
SHORT_METRICS = {THROUGHPUT: "train img/s", TEST_THROUGHPUT: "test img/s"}
# Columns of text, left-aligned; the others hold numbers.
TEXT_COLUMNS = ("job", "jobs", "status", "error")


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


@dataclass(frozen=True)
class Summary:
    """A cell standing for several runs: the mean, sample standard deviation (ddof=1) and
    count of their values; `std` is None below two values, `mean` None for none."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        mean = statistics.fmean(values) if values else None
        return cls(mean, statistics.stdev(values) if len(values) > 1 else None, len(values))


def metric_columns(runs: Sequence[Run], metric: str) -> list[str]:
    """`metric`, then the final metrics (`METRIC_COLUMNS`) and throughputs some run has."""
    wanted = [metric, *(m for m in METRIC_COLUMNS if m != metric)]
    metrics = [m for m in wanted if m == metric or any(m in run.metrics for run in runs)]
    return metrics + [name for name in THROUGHPUTS if any(name in run.metrics for run in runs)]


def comparison_table(runs: Sequence[Run], varied: Sequence[str], metric: str) -> Comparison:
    """Rows in the order of `runs`: job, the varied keys, status, final metrics, throughput, error.

    A metric column appears when at least one run has it, `metric` always and first; the
    error column when at least one run failed with an error.
    """
    metrics = metric_columns(runs, metric)
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
    """How a cell reads: 4 decimals for metrics, 1 for throughput, `mean ± std` for a
    `Summary` (the mean alone for one run), blank for nothing."""
    if isinstance(value, Summary):
        parts = [p for p in (value.mean, value.std) if p is not None]
        return " ± ".join(format_value(p, column) for p in parts)
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if column in THROUGHPUTS else f"{value:.4f}"
    return str(value)


def cell_text(row: dict[str, Any], column: str) -> str:
    """`format_value`, and `(n=2)` after a `Summary` over fewer or more runs than the row's `n`."""
    value = row[column]
    text = format_value(value, column)
    if isinstance(value, Summary) and value.n and value.n != row.get("n"):
        text += f" (n={value.n})"
    return text


def short_names(columns: Sequence[str]) -> dict[str, str]:
    """Column -> its terminal header: a dotted key's shortest suffix no other column ends with
    (`model.pos_embed` -> `pos_embed`), a throughput's `SHORT_METRICS` name, else as is."""
    short = {}
    for column in columns:
        parts = column.split(".")
        suffixes = [".".join(parts[-k:]) for k in range(1, len(parts))]
        others = [other for other in columns if other != column]
        free = (s for s in suffixes if not any(o == s or o.endswith("." + s) for o in others))
        short[column] = SHORT_METRICS.get(column) or next(free, column)
    return short


def print_table(table: Comparison, title: str = "Runs", console: Console | None = None) -> None:
    """Print the comparison so that every header and number stays whole at the console's width.

    The columns take short names (`short_names`, a legend under the table gives the full
    ones), error messages are listed under the table instead of in a column, and a table
    still wider than the console is transposed: a row per column, a column per job, split
    into as many tables as it takes. Failed jobs are red. `console`: where to print
    (default: a `Console()` of the terminal's width).
    """
    console = console or Console()
    columns = [c for c in table.columns if c != "error"]
    names = short_names(columns)
    console.print(Text(title, style="bold"))
    tables = [_wide_table(table, columns, names)]
    if _width(console, tables[0]) > console.width:
        tables = _transposed_tables(table, columns, names, console)
    for rich_table in tables:
        console.print(rich_table)
    legend = [f"{short} = {full}" for full, short in names.items() if short != full]
    for line in _packed(legend, console.width):
        console.print(Text(line, style="dim"))
    for row in table.rows:
        if row.get("error"):
            console.print(Text(f"{columns[0]} {row[columns[0]]} failed: {row['error']}", "red"))


def to_markdown(table: Comparison) -> str:
    """The comparison as a GitHub Markdown table."""

    def cell(row: dict[str, Any], column: str) -> str:
        return cell_text(row, column).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(table.columns) + " |",
        "|" + "|".join("---" for _ in table.columns) + "|",
        *("| " + " | ".join(cell(row, c) for c in table.columns) + " |" for row in table.rows),
    ]
    return "\n".join(lines) + "\n"


def write_csv(table: Comparison, path: Path) -> None:
    """The comparison as CSV, values unrounded; a column of `Summary` cells as three,
    `<column>_mean`, `<column>_std` and `<column>_n`."""
    summaries = {c for c in table.columns if any(isinstance(row[c], Summary) for row in table.rows)}

    def fields(column: str) -> list[str]:
        return (
            [f"{column}_{part}" for part in ("mean", "std", "n")]
            if column in summaries
            else [column]
        )

    def expand(row: dict[str, Any]) -> dict[str, Any]:
        flat = {}
        for column, value in row.items():
            if isinstance(value, Summary):
                flat.update(zip(fields(column), (value.mean, value.std, value.n), strict=True))
            else:
                flat[column] = value
        return flat

    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[f for c in table.columns for f in fields(c)])
        writer.writeheader()
        writer.writerows(expand(row) for row in table.rows)


def _is_numeric(table: Comparison, column: str) -> bool:
    """True for a column of numbers (right-aligned): a number or `Summary` in some row."""
    return column not in TEXT_COLUMNS and any(
        isinstance(row[column], int | float | Summary) for row in table.rows
    )


def _failed(row: dict[str, Any]) -> bool:
    return row.get("status") == "failed"


def _wide_table(table: Comparison, columns: Sequence[str], names: dict[str, str]) -> Table:
    """A row per job, a column per column: the form of `compare.md`."""
    rich_table = Table()
    for column in columns:
        justify = "right" if _is_numeric(table, column) else "left"
        rich_table.add_column(names[column], justify=justify)
    for row in table.rows:
        style = "red" if _failed(row) else None
        rich_table.add_row(*(Text(cell_text(row, c)) for c in columns), style=style)
    return rich_table


def _transposed_tables(
    table: Comparison, columns: Sequence[str], names: dict[str, str], console: Console
) -> list[Table]:
    """A row per column, a column per job (headed by its first cell: the job), jobs split
    over as many tables as it takes to fit `console`; one job wider than it still gets one."""
    tables: list[Table] = []
    chunk: list[dict[str, Any]] = []
    for row in table.rows:
        wider = _transposed(columns, names, [*chunk, row])
        if chunk and _width(console, wider) > console.width:
            tables.append(_transposed(columns, names, chunk))
            chunk = []
        chunk.append(row)
    return [*tables, _transposed(columns, names, chunk)]


def _transposed(columns: Sequence[str], names: dict[str, str], rows: Sequence[dict]) -> Table:
    """`rows` as columns, headed by their first cell; the other columns as rows."""
    head, *fields = columns
    # "fold" acts only on a job too wide for the console on its own: cut, but nothing lost.
    rich_table = Table()
    rich_table.add_column(names[head], overflow="fold")
    for row in rows:
        style = "red" if _failed(row) else None
        rich_table.add_column(
            Text(cell_text(row, head)), justify="right", style=style, overflow="fold"
        )
    for column in fields:
        rich_table.add_row(Text(names[column]), *(Text(cell_text(row, column)) for row in rows))
    return rich_table


def _packed(entries: Sequence[str], width: int, separator: str = "   ") -> list[str]:
    """`entries` joined into lines of at most `width` characters, none split (a longer one alone)."""
    lines: list[str] = []
    for entry in entries:
        if lines and len(lines[-1]) + len(separator) + len(entry) <= width:
            lines[-1] += separator + entry
        else:
            lines.append(entry)
    return lines


def _width(console: Console, table: Table) -> int:
    """The columns a table takes with no cell wrapped."""
    unbounded = console.options.update(max_width=10**6)
    return Measurement.get(console, unbounded, table).maximum
