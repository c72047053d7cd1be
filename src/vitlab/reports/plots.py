"""The plots of a sweep, and `write_report`, which writes them beside the table.

Figures are built with `matplotlib.figure.Figure`, never pyplot: no global state, no
window, and `savefig` renders PNG with the Agg backend, so this works headless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vitlab.reports.runs import Run, float_or_none
from vitlab.reports.table import (
    THROUGHPUTS,
    comparison_table,
    throughput_of,
    to_markdown,
    varied_keys,
    write_csv,
)

CURVE_METRIC = "val/acc"
# The axes of `acc_vs_patch_size.png` and `throughput_vs_patch_size.png`: x, one line per
# value, one subplot per value.
PATCH_SIZE, POS_EMBED, PRECISION = "model.patch_size", "model.pos_embed", "trainer.precision"
PLOT_FILES = (
    "val_acc_curves.png",
    "acc_vs_patch_size.png",
    "acc_vs_throughput.png",
    "throughput_vs_patch_size.png",
)


def run_label(run: Run, varied: Sequence[str]) -> str:
    """`job 3: 8, learned, bf16-mixed`: the job and its varied values."""
    values = ", ".join(str(run.overrides.get(key, "")) for key in varied)
    return f"job {run.name}: {values}" if values else f"job {run.name}"


def plot_val_curves(
    runs: Sequence[Run], varied: Sequence[str], metric: str = CURVE_METRIC
) -> Figure:
    """`metric` (validation accuracy) against epoch, one line per run; against step if some
    run validates more than once an epoch or logs no epoch."""
    curves = [(run, run.curve(metric)) for run in runs]
    curves = [(run, rows) for run, rows in curves if rows]
    by_epoch = all(
        all("epoch" in row for row in rows) and len({row["epoch"] for row in rows}) == len(rows)
        for _, rows in curves
    )
    axis = "epoch" if by_epoch else "step"
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    for run, rows in curves:
        points = [(row[axis], row[metric]) for row in rows if axis in row]
        label = run_label(run, varied) + (" (failed)" if run.failed else "")
        style = "--" if run.failed else "-"
        ax.plot(*zip(*points, strict=True), style, marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if curves:
        ax.legend(fontsize="small", loc="best")
    else:
        _explain_empty_axes(ax, f"no run logged {metric}")
    ax.set(xlabel=axis, ylabel=metric, title=f"{metric} during training")
    ax.grid(alpha=0.3)
    return fig


def plot_metric_vs_patch_size(runs: Sequence[Run], metric: str) -> Figure:
    """Final `metric` against `model.patch_size`: a line per `model.pos_embed`, a subplot per
    `trainer.precision`. A key that does not vary gives one line or one subplot.

    `model.patch_size` is the overridden value where there is one: an eval sweep
    (`src/eval.py -m +model.patch_size=2,4,8`) plots one checkpoint at each size.
    """
    return _plot_vs_patch_size(runs, lambda run: float_or_none(run.metrics.get(metric)), metric)


def plot_throughput_vs_patch_size(runs: Sequence[Run]) -> Figure:
    """Images/s against `model.patch_size`, laid out as `plot_metric_vs_patch_size`.

    A run's images/s is its training's, or its test loop's for an eval run (`throughput_of`).
    """
    label = f"{_throughput_name(runs)} (images/s)"
    return _plot_vs_patch_size(runs, _images_per_sec, label)


def _plot_vs_patch_size(
    runs: Sequence[Run], value_of: Callable[[Run], float | None], ylabel: str
) -> Figure:
    """`value_of(run)` against `model.patch_size`, a line per position encoding, a subplot per
    precision; runs without a value or a patch size are left out."""
    done = [run for run in runs if value_of(run) is not None]
    facets = sorted({_as_label(run.value(PRECISION)) for run in done}) or ["-"]
    lines = sorted({_as_label(run.value(POS_EMBED)) for run in done})
    fig = Figure(figsize=(5 * len(facets), 4.5), layout="constrained")
    axes = fig.subplots(1, len(facets), sharey=True, squeeze=False)[0]
    for ax, precision in zip(axes, facets, strict=True):
        facet = [run for run in done if _as_label(run.value(PRECISION)) == precision]
        for color, pos_embed in enumerate(lines):
            points = sorted(
                (float_or_none(run.value(PATCH_SIZE)), value_of(run))
                for run in facet
                if _as_label(run.value(POS_EMBED)) == pos_embed
                and float_or_none(run.value(PATCH_SIZE)) is not None
            )
            if points:
                label = f"{POS_EMBED}={pos_embed}"
                ax.plot(*zip(*points, strict=True), marker="o", color=f"C{color}", label=label)
        if ax.lines:
            ax.legend(fontsize="small")
            ax.set_xticks(sorted({x for line in ax.lines for x in line.get_xdata()}))
        else:
            _explain_empty_axes(ax, f"no finished run with {ylabel} and {PATCH_SIZE}")
        ax.set(xlabel=PATCH_SIZE, ylabel=ylabel, title=f"{PRECISION}={precision}")
        ax.grid(alpha=0.3)
    return fig


def plot_metric_vs_throughput(runs: Sequence[Run], varied: Sequence[str], metric: str) -> Figure:
    """Final `metric` against throughput (images/s), one labelled point per run: training
    throughput, or the test loop's for an eval run (`throughput_of`)."""
    points = [
        (run, speed, run.metrics[metric])
        for run in runs
        if (speed := _images_per_sec(run)) is not None
        and float_or_none(run.metrics.get(metric)) is not None
    ]
    names = _throughput_name([run for run, _, _ in points])
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    for run, speed, value in points:
        ax.scatter(speed, value)
        ax.annotate(
            run_label(run, varied),
            (speed, value),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.margins(x=0.25, y=0.1)  # room for the labels
    if not points:
        _explain_empty_axes(ax, f"no finished run with {metric} and {names}")
    ax.set(xlabel=f"{names} (images/s)", ylabel=metric, title=f"{metric} vs throughput")
    ax.grid(alpha=0.3)
    return fig


def write_report(runs: Sequence[Run], out_dir: Path, metric: str) -> list[Path]:
    """Write `compare.md`, `compare.csv` and the four plots (`PLOT_FILES`) into `out_dir`; return their paths.

    `runs` are written in the order given (sort them first with `sort_runs`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    varied = varied_keys(runs)
    table = comparison_table(runs, varied, metric)
    markdown, table_csv = out_dir / "compare.md", out_dir / "compare.csv"
    markdown.write_text(to_markdown(table))
    write_csv(table, table_csv)
    figures = (
        plot_val_curves(runs, varied),
        plot_metric_vs_patch_size(runs, metric),
        plot_metric_vs_throughput(runs, varied, metric),
        plot_throughput_vs_patch_size(runs),
    )
    plots = [out_dir / name for name in PLOT_FILES]
    for fig, path in zip(figures, plots, strict=True):
        fig.savefig(path, dpi=120)
    return [markdown, table_csv, *plots]


def _images_per_sec(run: Run) -> float | None:
    """The run's throughput (`throughput_of`), None if it has none."""
    speed = throughput_of(run)
    return speed[1] if speed else None


def _throughput_name(runs: Sequence[Run]) -> str:
    """The throughput metrics the runs have, `a / b`, for an axis; the training one if none."""
    names = dict.fromkeys(speed[0] for run in runs if (speed := throughput_of(run)))
    return " / ".join(names) or THROUGHPUTS[0]


def _as_label(value: Any) -> str:
    """A config value as a line or subplot label; `?` for a run that lacks the key."""
    return "?" if value is None else str(value)


def _explain_empty_axes(ax: Axes, text: str) -> None:
    """Say in the middle of `ax`, in grey, why it has nothing to show."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
