"""The plots of a sweep, and `write_report`, which writes them beside the table.

Figures are built with `matplotlib.figure.Figure`, never pyplot: no global state, no
window, and `savefig` renders PNG with the Agg backend, so this works headless. A sweep
that repeats its configurations over seeds or folds is plotted a point per group
(`vitlab.reports.aggregate`), at the mean, with the standard deviation as error bars.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import Bbox

from vitlab.reports.aggregate import Group, group_runs, mean_table
from vitlab.reports.runs import Run, float_or_none
from vitlab.reports.table import (
    THROUGHPUTS,
    Summary,
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
# The scatter plot's labels, in points: the clearance (x, y) around each label and point,
# the radius of a point (matplotlib's default marker is 6 across), and how far from its
# point a label may sit before a leader line joins them.
LABEL_GAP, MARKER_RADIUS, LEADER_AFTER = (5.0, 1.5), 3.0, 12.0


def run_label(run: Run, varied: Sequence[str]) -> str:
    """`job 3: 8, learned, bf16-mixed`: the job and its varied values."""
    return Group([run], {key: run.overrides.get(key) for key in varied}).label


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
    return _plot_vs_patch_size(runs, lambda group: group.summary(metric), metric)


def plot_throughput_vs_patch_size(runs: Sequence[Run]) -> Figure:
    """Images/s against `model.patch_size`, laid out as `plot_metric_vs_patch_size`.

    A run's images/s is its training's, or its test loop's for an eval run (`throughput_of`).
    """
    label = f"{_throughput_name(runs)} (images/s)"
    return _plot_vs_patch_size(runs, Group.throughput, label)


def _plot_vs_patch_size(
    runs: Sequence[Run], value_of: Callable[[Group], Summary], ylabel: str
) -> Figure:
    """`value_of(group)` against `model.patch_size`, a line per position encoding, a subplot
    per precision, error bars where a group repeats; groups without a value or a patch size
    are left out."""
    groups = [group for group in group_runs(runs, varied_keys(runs)) if value_of(group).n]
    bars = any(value_of(group).n > 1 for group in groups)
    facets = sorted({_as_label(group.value(PRECISION)) for group in groups}) or ["-"]
    lines = sorted({_as_label(group.value(POS_EMBED)) for group in groups})
    fig = Figure(figsize=(5 * len(facets), 4.5), layout="constrained")
    axes = fig.subplots(1, len(facets), sharey=True, squeeze=False)[0]
    for ax, precision in zip(axes, facets, strict=True):
        facet = [group for group in groups if _as_label(group.value(PRECISION)) == precision]
        for color, pos_embed in enumerate(lines):
            points = sorted(
                (
                    (x, value_of(group))
                    for group in facet
                    if _as_label(group.value(POS_EMBED)) == pos_embed
                    and (x := float_or_none(group.value(PATCH_SIZE))) is not None
                ),
                key=lambda point: (point[0], point[1].mean),
            )
            if points:
                xs, values = zip(*points, strict=True)
                means = [value.mean for value in values]
                style = {"marker": "o", "color": f"C{color}", "label": f"{POS_EMBED}={pos_embed}"}
                if bars:
                    ax.errorbar(xs, means, yerr=[_error(v) for v in values], capsize=3, **style)
                else:
                    ax.plot(xs, means, **style)
        if ax.lines:
            ax.legend(fontsize="small")
            ax.set_xticks(sorted({x for line in ax.lines for x in line.get_xdata()}))
        else:
            _explain_empty_axes(ax, f"no finished run with {ylabel} and {PATCH_SIZE}")
        ax.set(xlabel=PATCH_SIZE, ylabel=ylabel, title=f"{PRECISION}={precision}")
        ax.grid(alpha=0.3)
    return fig


def plot_metric_vs_throughput(runs: Sequence[Run], varied: Sequence[str], metric: str) -> Figure:
    """Final `metric` against throughput (images/s), one labelled point per run, or per group
    of repeats at its mean with error bars: training throughput, or the test loop's for an
    eval run (`throughput_of`). The labels are placed so that none covers another."""
    points = [
        (group, speed, value)
        for group in group_runs(runs, varied)
        if (speed := group.throughput()).n and (value := group.summary(metric)).n
    ]
    bars = any(summary.n > 1 for _, speed, value in points for summary in (speed, value))
    names = _throughput_name([run for group, _, _ in points for run in group.runs])
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    for _, speed, value in points:
        if bars:
            ax.errorbar(
                speed.mean, value.mean, yerr=_error(value), xerr=_error(speed), fmt="o", capsize=3
            )
        else:
            ax.scatter(speed.mean, value.mean)
    ax.margins(x=0.25, y=0.1)  # room for the labels
    if not points:
        _explain_empty_axes(ax, f"no finished run with {metric} and {names}")
    ax.set(xlabel=f"{names} (images/s)", ylabel=metric, title=f"{metric} vs throughput")
    ax.grid(alpha=0.3)
    _place_labels(
        fig, ax, [(group.label, (speed.mean, value.mean)) for group, speed, value in points]
    )
    return fig


def write_report(runs: Sequence[Run], out_dir: Path, metric: str) -> list[Path]:
    """Write `compare.md`, `compare.csv` and the four plots (`PLOT_FILES`) into `out_dir`; return their paths.

    `runs` are written in the order given (sort them first with `sort_runs`). A sweep over
    `seed` or `data.fold` also gets `compare_mean.md` and `compare_mean.csv` (`mean_table`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    varied = varied_keys(runs)
    tables = {
        "compare": comparison_table(runs, varied, metric),
        "compare_mean": mean_table(runs, metric),
    }
    written = []
    for name, table in tables.items():
        if table is not None:
            markdown, table_csv = out_dir / f"{name}.md", out_dir / f"{name}.csv"
            markdown.write_text(to_markdown(table))
            write_csv(table, table_csv)
            written += [markdown, table_csv]
    figures = (
        plot_val_curves(runs, varied),
        plot_metric_vs_patch_size(runs, metric),
        plot_metric_vs_throughput(runs, varied, metric),
        plot_throughput_vs_patch_size(runs),
    )
    plots = [out_dir / name for name in PLOT_FILES]
    for fig, path in zip(figures, plots, strict=True):
        fig.savefig(path, dpi=120)
    return [*written, *plots]


def _error(summary: Summary) -> float:
    """The error bar of a point: its std; NaN (no bar) for a single run."""
    return math.nan if summary.std is None else summary.std


def _place_labels(fig: Figure, ax: Axes, labels: Sequence[tuple[str, tuple[float, float]]]) -> None:
    """Annotate each point with its text at the nearest free place inside `ax`: one that covers
    no point and no label placed before it (greedy, in order), the right of the point first.
    A label that had to move away gets a grey leader line to its point.

    The places are measured on the final layout: the figure is drawn once (Agg, headless),
    and the labels are kept out of the layout so that placing them cannot move the axes.
    """
    leader = {"arrowstyle": "-", "color": "0.6", "linewidth": 0.6, "shrinkB": MARKER_RADIUS}
    annotations = [
        ax.annotate(
            text, xy, xytext=(0, 0), textcoords="offset points", fontsize=7, arrowprops=leader
        )
        for text, xy in labels
    ]
    if not annotations:
        return
    for annotation in annotations:
        annotation.set_in_layout(False)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    points = fig.dpi / 72  # pixels per point
    frame = ax.get_window_extent(renderer)
    centers = np.array([ax.transData.transform(xy) for _, xy in labels])
    radius = MARKER_RADIUS * points
    taken = list(np.concatenate([centers - radius, centers + radius], axis=1))  # x0, y0, x1, y1
    for annotation, center in zip(annotations, centers, strict=True):
        text = Text.get_window_extent(annotation, renderer)  # the text alone, not its leader
        corner, distance = _free_corner(text.size, center, frame, np.array(taken), points)
        annotation.xyann = tuple((corner - text.p0) / points)
        annotation.arrow_patch.set_visible(distance > LEADER_AFTER * points)
        taken.append(np.concatenate([corner, corner + text.size]))


def _free_corner(
    size: np.ndarray, center: np.ndarray, frame: Bbox, taken: np.ndarray, points: float
) -> tuple[np.ndarray, float]:
    """Where the lower-left corner of a box of `size` (pixels) goes: the candidate on a grid
    over `frame` nearest to `center` whose box keeps `LABEL_GAP` from every `taken` box
    (rows x0, y0, x1, y1), then its distance to `center`. Nearest counts in clearances, so a
    box beside the point comes before one as close below it; then the right before the left,
    then level with the point. None free: right of `center`."""
    gap_x, gap_y = (gap * points for gap in LABEL_GAP)
    xs = np.arange(frame.x0 + gap_y, frame.x1 - gap_y - size[0], gap_x / 2)
    ys = np.arange(frame.y0 + gap_y, frame.y1 - gap_y - size[1], gap_y)
    x0, y0 = (grid.ravel() for grid in np.meshgrid(xs, ys))
    x1, y1 = x0 + size[0], y0 + size[1]
    covers = (
        (x0[:, None] < taken[:, 2] + gap_x)
        & (x1[:, None] > taken[:, 0] - gap_x)
        & (y0[:, None] < taken[:, 3] + gap_y)
        & (y1[:, None] > taken[:, 1] - gap_y)
    ).any(axis=1)
    dx = np.maximum(np.maximum(x0 - center[0], center[0] - x1), 0)
    dy = np.maximum(np.maximum(y0 - center[1], center[1] - y1), 0)
    distance = np.hypot(dx, dy)
    nearness = np.round(np.hypot(dx / gap_x, dy / gap_y))  # in clearances: beside before below
    order = np.lexsort((np.abs((y0 + y1) / 2 - center[1]), x0 < center[0], nearness))
    free = order[~covers[order]]
    if not free.size:
        return center + np.array([MARKER_RADIUS * points + gap_x, -size[1] / 2]), 0.0
    best = free[0]
    return np.array([x0[best], y0[best]]), float(distance[best])


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
