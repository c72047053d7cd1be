"""Read finished runs back from disk and compare them: a table, its files, and plots.

`python src/compare.py <multirun folder>` and `notebooks/compare_sweep.ipynb` both use
this module; neither needs a server. A run (a single run, or one job of a multirun) is
read from the files the pipeline leaves in its folder:

- `.hydra/config.yaml`: the composed config (interpolations resolved where they can be);
- `.hydra/overrides.yaml`, else `status.json`'s `overrides`: the command-line overrides;
- `status.json`: `status` (completed | failed) and `error`;
- `metrics.json`: the final metrics;
- `csv/metrics.csv`: the logged history (the CSV logger's sparse rows);
- `wandb/offline-run-*/run-*.wandb` (the newest), when the run has no CSV or JSON: the
  W&B transaction log, read record by record (history, summary, config, tags, exit code).

A failed job is kept (its status and error are the point) but its final metrics
are blank: the last values it logged are not results.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import rich
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf
from rich.table import Table

from vitlab.errors import VitlabError
from vitlab.runs.multirun import STATUS_FILE
from vitlab.runs.validate import is_number

if TYPE_CHECKING:
    from wandb.proto.wandb_internal_pb2 import Record

DEFAULT_METRIC = "val/acc"
THROUGHPUT = "train/samples_per_sec"
# Final metrics shown when at least one run has them, in this order (the sort metric first).
METRIC_COLUMNS = ("test/acc", "val/acc", "test/loss", "val/loss", "train/acc", "train/loss")
CURVE_METRIC = "val/acc"
# The axes of `acc_vs_patch_size.png`: x, one line per value, one subplot per value.
PATCH_SIZE, POS_EMBED, PRECISION = "model.patch_size", "model.pos_embed", "trainer.precision"
PLOT_FILES = ("val_acc_curves.png", "acc_vs_patch_size.png", "acc_vs_throughput.png")


class NoRunsError(VitlabError, FileNotFoundError):
    """A folder given to compare holds no run that can be read."""


@dataclass
class Run:
    """One run or multirun job, as read from its folder.

    Attributes:
        path: the run folder.
        name: what the table calls it: the folder name (the job number in a multirun),
            or the whole path where folder names clash.
        status: `completed`, `failed`, or `unknown` when the folder does not say.
        error: `"<type>: <message>"` for a failed run, else None.
        overrides: the command-line overrides, key -> value as typed (`{"model.patch_size": "8"}`).
        config: the run config flattened to dotted keys (`{"model.patch_size": 8, ...}`).
        metrics: the final metrics (blank for a failed run).
        history: the logged rows in order, each with only the metrics logged at that
            point, plus `step` (the global step) and `epoch` where known.
    """

    path: Path
    name: str
    status: str = "unknown"
    error: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def value(self, key: str) -> Any:
        """The value of a config key: as overridden on the command line, else from the config."""
        return self.overrides.get(key, self.config.get(key))

    def curve(self, metric: str) -> list[dict[str, float]]:
        """The history rows in which `metric` was logged (each has `metric`, and `step`/`epoch` if known)."""
        return [row for row in self.history if metric in row]


# ----------------------------------------------------------------------------- reading


def is_run_dir(path: Path) -> bool:
    """True if `path` is a run or job folder (it has the pipeline's or a logger's files)."""
    markers = (".hydra", STATUS_FILE, "metrics.json", "csv/metrics.csv", "wandb")
    return path.is_dir() and any((path / marker).exists() for marker in markers)


def find_run_dirs(path: Path) -> list[Path]:
    """`[path]` for a run folder; the job folders, in job order, for a multirun folder."""
    if is_run_dir(path):
        return [path]
    if not path.is_dir():
        return []
    jobs = [child for child in path.iterdir() if is_run_dir(child)]
    return sorted(
        jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)
    )


def newest_sweep(multiruns_dir: Path) -> Path:
    """The newest multirun folder under `multiruns_dir` (`logs/train/multiruns`): names are dates."""
    sweeps = (
        sorted(p for p in multiruns_dir.glob("*") if p.is_dir()) if multiruns_dir.is_dir() else []
    )
    if not sweeps:
        raise NoRunsError(
            f"No multirun folders under {multiruns_dir}; run a sweep first "
            "(`python src/train.py -m sweep=patch_pos_precision`) or give a folder"
        )
    return sweeps[-1]


def load_runs(paths: Iterable[Path | str]) -> list[Run]:
    """Read every run under `paths` (run folders or multirun folders), failed ones included.

    Raises `NoRunsError`, naming the folders, when there is none.
    """
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise NoRunsError(f"No such folder: {', '.join(missing)}")
    run_dirs = [run_dir for path in paths for run_dir in find_run_dirs(path)]
    names = [run_dir.name for run_dir in run_dirs]
    if len(set(names)) < len(names):  # jobs of different sweeps: "0" is not enough
        names = [str(run_dir) for run_dir in run_dirs]
    runs = [load_run(run_dir, name) for run_dir, name in zip(run_dirs, names, strict=True)]
    if not runs:
        where = ", ".join(str(p) for p in paths)
        raise NoRunsError(
            f"No runs in {where}: give a multirun folder (logs/train/multiruns/<time>) or run "
            "folders (each with .hydra/, status.json, metrics.json, csv/metrics.csv or wandb/)"
        )
    return runs


def load_run(path: Path, name: str | None = None) -> Run:
    """Read one run folder (see the module docstring for the files and their precedence)."""
    run = Run(path=path, name=name or path.name)
    status = _read_json(path / STATUS_FILE)
    if status:
        run.status, run.error = status.get("status", "unknown"), status.get("error")
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else None
    if overrides is None:
        overrides = status.get("overrides", []) if status else []
    run.overrides = parse_overrides(overrides)
    run.config = _read_config(path / ".hydra" / "config.yaml")
    metrics_csv = path / "csv" / "metrics.csv"
    if metrics_csv.is_file():
        run.history = read_metrics_csv(metrics_csv)
    run.metrics = _read_json(path / "metrics.json") or {}
    wandb_logs = sorted(path.glob("wandb/offline-run-*/run-*.wandb"))
    if wandb_logs and not (run.history or run.metrics):
        _fill_from_wandb(run, read_wandb_run(wandb_logs[-1]))
    if run.failed:
        run.metrics = {}
    elif not run.metrics:  # a run still going, or killed before it wrote metrics.json
        run.metrics = _last_values(run.history)
    return run


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """`["model.patch_size=8", "+foo=1"]` -> `{"model.patch_size": "8", "foo": "1"}` (deletions `~k` skipped)."""
    parsed = {}
    for override in overrides:
        key, sep, value = str(override).partition("=")
        if sep and not key.startswith("~"):
            parsed[key.lstrip("+")] = value
    return parsed


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    """The CSV logger's rows, each reduced to the columns it has a number in (NaN dropped)."""
    with path.open(newline="") as file:
        rows = [
            {key: _number(value) for key, value in row.items() if key}
            for row in csv.DictReader(file)
        ]
    return [{k: v for k, v in row.items() if v is not None} for row in rows if any(row.values())]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:  # a job killed while writing it
        return None


def _read_config(path: Path) -> dict[str, Any]:
    """`.hydra/config.yaml` flattened; an interpolation that needs Hydra (`${hydra:...}`) stays as text."""
    if not path.is_file():
        return {}
    cfg = OmegaConf.load(path)
    flat = flatten(OmegaConf.to_container(cfg, resolve=False))
    for key, value in flat.items():
        if isinstance(value, str) and "${" in value:
            with contextlib.suppress(Exception):  # any resolver error: keep the raw text
                flat[key] = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    return flat


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one dict with dotted keys; lists and scalars are leaves."""
    if not isinstance(node, dict):
        return {prefix: node} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _last_values(history: Sequence[dict[str, float]]) -> dict[str, float]:
    """The last logged value of every metric, as final metrics."""
    last: dict[str, float] = {}
    for row in history:
        last.update(row)
    return _as_final(last)


def _as_final(values: dict[str, float]) -> dict[str, float]:
    """Logged values named as `metrics.json` names them: no step counters, `train/loss` the
    epoch loss (Lightning logs it as `train/loss_epoch`)."""
    final = {k: v for k, v in values.items() if k not in ("step", "epoch", "trainer/global_step")}
    if "train/loss" not in final and "train/loss_epoch" in final:
        final["train/loss"] = final["train/loss_epoch"]
    return final


# ----------------------------------------------------------------------------- W&B offline

_WANDB_IDENT, _WANDB_MAGIC = b":W&B", 0xBEE1
_FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32 of type byte + data, data length, chunk type
_BLOCK_SIZE = 32 * 1024
_FULL, _FIRST, _LAST = 1, 2, 4


@dataclass
class WandbRun:
    """What an offline W&B run recorded: its config, summary, history, naming and exit code."""

    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    group: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    exit_code: int | None = None


def wandb_records(path: Path) -> Iterator[Record]:
    """The protobuf records of a `run-*.wandb` file, in order.

    The file is a LevelDB-style log: a 7-byte header (`:W&B`, magic, version), then
    32 KiB blocks of chunks (crc32, length, type FULL | FIRST | MIDDLE | LAST); a record
    may span blocks. Reading stops quietly at the first incomplete or corrupt chunk, so
    the file of a run that is still going, or that crashed, gives what it holds.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    if len(data) < _FILE_HEADER.size:  # created, nothing written yet
        return
    if _FILE_HEADER.unpack_from(data)[:2] != (_WANDB_IDENT, _WANDB_MAGIC):
        raise VitlabError(f"{path} is not a W&B run file (no `:W&B` header)")
    pos, chunks = _FILE_HEADER.size, []
    while pos + _CHUNK_HEADER.size <= len(data):
        room = _BLOCK_SIZE - pos % _BLOCK_SIZE
        if room < _CHUNK_HEADER.size:  # a block's zero trailer
            pos += room
            continue
        checksum, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        start = pos + _CHUNK_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            return
        pos = start + length
        chunks = [chunk] if kind in (_FULL, _FIRST) else [*chunks, chunk]
        if kind in (_FULL, _LAST):
            record = Record()
            record.ParseFromString(b"".join(chunks))
            yield record


def read_wandb_run(path: Path) -> WandbRun:
    """Replay a `run-*.wandb` file: config and summary updates applied in order, history rows kept."""
    run = WandbRun()
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.group, run.name, run.tags = (
                record.run.run_group,
                record.run.display_name,
                list(record.run.tags),
            )
            _apply_updates(run.config, record.run.config)
            _apply_updates(run.summary, record.run.summary)
        elif kind == "config":
            _apply_updates(run.config, record.config)
        elif kind == "summary":
            _apply_updates(run.summary, record.summary)
        elif kind == "history":
            run.history.append({_item_key(item): _item_value(item) for item in record.history.item})
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def _item_key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def _item_value(item: Any) -> Any:
    kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if kind is None:
        return json.loads(item.value_json) if item.value_json else None
    if kind == "none":
        return None
    return json.loads(item.json) if kind == "json" else getattr(item, kind)


def _apply_updates(target: dict[str, Any], record: Any) -> None:
    for item in record.update:
        target[_item_key(item)] = json.loads(item.value_json)
    for item in record.remove:
        target.pop(_item_key(item), None)


def _fill_from_wandb(run: Run, wandb_run: WandbRun) -> None:
    """A W&B-only run: config, overrides (the pipeline tags a job with them), history, summary, status.

    The pipeline's W&B config holds the run config under `config` (the classifier's
    hyperparameter); a config logged directly (`wandb.init(config=...)`) is used as is.
    """
    config = wandb_run.config.get("config")
    run.config = run.config or flatten(config if isinstance(config, dict) else wandb_run.config)
    run.overrides = run.overrides or parse_overrides(t for t in wandb_run.tags if "=" in t)
    run.history = [_history_row(row) for row in wandb_run.history]
    run.history = [row for row in run.history if set(row) - {"step", "epoch"}]
    summary = {
        key: float(value)
        for key, value in wandb_run.summary.items()
        if not key.startswith("_") and is_number(value)
    }
    run.metrics = _as_final(summary) if summary else _last_values(run.history)
    if run.status == "unknown" and wandb_run.exit_code is not None:
        run.status = "completed" if wandb_run.exit_code == 0 else "failed"


def _history_row(row: dict[str, Any]) -> dict[str, float]:
    """A W&B history row in the CSV logger's terms: numbers only, `step` the global step."""
    step = row.get("trainer/global_step", row.get("_step"))
    out = {k: float(v) for k, v in row.items() if not k.startswith("_") and is_number(v)}
    out.pop("trainer/global_step", None)
    if is_number(step):
        out["step"] = float(step)
    return out


# ----------------------------------------------------------------------------- comparing


def optimized_metric(runs: Sequence[Run]) -> str:
    """The metric the sweep optimised: the runs' `optimized_metric` config key, else `val/acc`."""
    for run in runs:
        metric = run.config.get("optimized_metric")
        if isinstance(metric, str) and metric:
            return metric
    return DEFAULT_METRIC


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
    if any(THROUGHPUT in run.metrics for run in runs):
        metrics.append(THROUGHPUT)
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
        return f"{value:.1f}" if column == THROUGHPUT else f"{value:.4f}"
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


# ----------------------------------------------------------------------------- plots
# Figures are built with `matplotlib.figure.Figure`, never pyplot: no global state, no
# window, and `savefig` renders PNG with the Agg backend, so this works headless.


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
        _note(ax, f"no run logged {metric}")
    ax.set(xlabel=axis, ylabel=metric, title=f"{metric} during training")
    ax.grid(alpha=0.3)
    return fig


def plot_metric_vs_patch_size(runs: Sequence[Run], metric: str) -> Figure:
    """Final `metric` against `model.patch_size`: a line per `model.pos_embed`, a subplot per
    `trainer.precision`. A key that does not vary gives one line or one subplot."""
    done = [run for run in runs if _number(run.metrics.get(metric)) is not None]
    facets = sorted({_text(run.value(PRECISION)) for run in done}) or ["-"]
    lines = sorted({_text(run.value(POS_EMBED)) for run in done})
    fig = Figure(figsize=(5 * len(facets), 4.5), layout="constrained")
    axes = fig.subplots(1, len(facets), sharey=True, squeeze=False)[0]
    for ax, precision in zip(axes, facets, strict=True):
        facet = [run for run in done if _text(run.value(PRECISION)) == precision]
        for color, pos_embed in enumerate(lines):
            points = sorted(
                (_number(run.value(PATCH_SIZE)), run.metrics[metric])
                for run in facet
                if _text(run.value(POS_EMBED)) == pos_embed
                and _number(run.value(PATCH_SIZE)) is not None
            )
            if points:
                label = f"{POS_EMBED}={pos_embed}"
                ax.plot(*zip(*points, strict=True), marker="o", color=f"C{color}", label=label)
        if ax.lines:
            ax.legend(fontsize="small")
            ax.set_xticks(sorted({x for line in ax.lines for x in line.get_xdata()}))
        else:
            _note(ax, f"no finished run with {metric} and {PATCH_SIZE}")
        ax.set(xlabel=PATCH_SIZE, ylabel=metric, title=f"{PRECISION}={precision}")
        ax.grid(alpha=0.3)
    return fig


def plot_metric_vs_throughput(runs: Sequence[Run], varied: Sequence[str], metric: str) -> Figure:
    """Final `metric` against training throughput (images/s), one labelled point per run."""
    points = [
        (run, run.metrics[THROUGHPUT], run.metrics[metric])
        for run in runs
        if _number(run.metrics.get(THROUGHPUT)) is not None
        and _number(run.metrics.get(metric)) is not None
    ]
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
        _note(ax, f"no finished run with {metric} and {THROUGHPUT}")
    ax.set(xlabel=f"{THROUGHPUT} (images/s)", ylabel=metric, title=f"{metric} vs throughput")
    ax.grid(alpha=0.3)
    return fig


def _number(value: Any) -> float | None:
    """`8`, `8.0`, `"8"` -> 8.0; anything else (text, NaN, None) -> None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _text(value: Any) -> str:
    return "?" if value is None else str(value)


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


# ----------------------------------------------------------------------------- all at once


def write_report(runs: Sequence[Run], out_dir: Path, metric: str) -> list[Path]:
    """Write `compare.md`, `compare.csv` and the three plots into `out_dir`; return their paths.

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
    )
    plots = [out_dir / name for name in PLOT_FILES]
    for fig, path in zip(figures, plots, strict=True):
        fig.savefig(path, dpi=120)
    return [markdown, table_csv, *plots]
