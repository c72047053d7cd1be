"""Read finished runs back from disk: one `Run` per run or multirun job.

A run is read from the files the pipeline leaves in its folder:

- `.hydra/config.yaml`: the composed config (interpolations resolved where they can be), and
  `run_config.yaml`, where an eval run saves the model and data it took from its checkpoint;
- `.hydra/overrides.yaml`, else `status.json`'s `overrides`: the command-line overrides;
- `status.json`: `status` (completed | failed) and `error`;
- `metrics.json`: the final metrics;
- `csv/metrics.csv`: the logged history (the CSV logger's sparse rows);
- `wandb/offline-run-*/run-*.wandb` (the newest), when the run has no CSV or JSON: the
  W&B transaction log (`vitlab.reports.wandb_log`).

A failed job is kept (its status and error are the point) but its final metrics
are blank: the last values it logged are not results.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from vitlab.errors import VitlabError
from vitlab.reports.wandb_log import WandbRun, read_wandb_run
from vitlab.runs.multirun import STATUS_FILE
from vitlab.runs.validate import is_number

# What the CSV logger and W&B log beside the metrics: counters, not results.
_STEP_COUNTERS = ("step", "epoch", "trainer/global_step")


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


# ----------------------------------------------------------------------------- folders


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
    return sorted(jobs, key=lambda job: job_order(job.name))


def job_order(name: str) -> tuple[bool, int, str]:
    """The sort key of a run name: multirun jobs (`0`, `1`, ... `10`) by number, then other names."""
    return not name.isdigit(), int(name) if name.isdigit() else 0, name


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


# ----------------------------------------------------------------------------- reading


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
    status = _read_json_or_none(path / STATUS_FILE)
    if status:
        run.status, run.error = status.get("status", "unknown"), status.get("error")
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else None
    if overrides is None:
        overrides = status.get("overrides", []) if status else []
    run.overrides = parse_overrides(overrides)
    run.config = _read_flat_config(path / ".hydra" / "config.yaml")
    # An eval run also saves the model and data it took from its checkpoint (`tasks.evaluate`).
    run.config.update(_read_flat_config(path / "run_config.yaml"))
    metrics_csv = path / "csv" / "metrics.csv"
    if metrics_csv.is_file():
        run.history = read_metrics_csv(metrics_csv)
    run.metrics = _read_json_or_none(path / "metrics.json") or {}
    wandb_logs = sorted(path.glob("wandb/offline-run-*/run-*.wandb"))
    if wandb_logs and not (run.history or run.metrics):
        _fill_from_wandb_run(run, read_wandb_run(wandb_logs[-1]))
    if run.failed:
        run.metrics = {}
    elif not run.metrics:  # a run still going, or killed before it wrote metrics.json
        run.metrics = _final_from_history(run.history)
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
            {key: float_or_none(value) for key, value in row.items() if key}
            for row in csv.DictReader(file)
        ]
    return [{k: v for k, v in row.items() if v is not None} for row in rows if any(row.values())]


def float_or_none(value: Any) -> float | None:
    """`8`, `8.0`, `"8"` -> 8.0; anything else (text, NaN, None) -> None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one dict with dotted keys; lists and scalars are leaves."""
    if not isinstance(node, dict):
        return {prefix: node} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _read_json_or_none(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None when the file is missing or half-written."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:  # a job killed while writing it
        return None


def _read_flat_config(path: Path) -> dict[str, Any]:
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


def _final_from_history(history: Sequence[dict[str, float]]) -> dict[str, float]:
    """The last logged value of every metric, as final metrics."""
    last: dict[str, float] = {}
    for row in history:
        last.update(row)
    return _as_final_metrics(last)


def _as_final_metrics(values: dict[str, float]) -> dict[str, float]:
    """Logged values named as `metrics.json` names them: no step counters, `train/loss` the
    epoch loss (Lightning logs it as `train/loss_epoch`)."""
    final = {k: v for k, v in values.items() if k not in _STEP_COUNTERS}
    if "train/loss" not in final and "train/loss_epoch" in final:
        final["train/loss"] = final["train/loss_epoch"]
    return final


# ----------------------------------------------------------------------------- W&B-only runs


def _fill_from_wandb_run(run: Run, wandb_run: WandbRun) -> None:
    """A W&B-only run: config, overrides (the pipeline tags a job with them), history, summary, status.

    The pipeline's W&B config holds the run config under `config` (the classifier's
    hyperparameter); a config logged directly (`wandb.init(config=...)`) is used as is.
    """
    config = wandb_run.config.get("config")
    run.config = run.config or flatten(config if isinstance(config, dict) else wandb_run.config)
    run.overrides = run.overrides or parse_overrides(t for t in wandb_run.tags if "=" in t)
    run.history = [_as_csv_row(row) for row in wandb_run.history]
    run.history = [row for row in run.history if set(row) - {"step", "epoch"}]
    summary = {
        key: float(value)
        for key, value in wandb_run.summary.items()
        if not key.startswith("_") and is_number(value)
    }
    run.metrics = _as_final_metrics(summary) if summary else _final_from_history(run.history)
    if run.status == "unknown" and wandb_run.exit_code is not None:
        run.status = "completed" if wandb_run.exit_code == 0 else "failed"


def _as_csv_row(row: dict[str, Any]) -> dict[str, float]:
    """A W&B history row in the CSV logger's terms: numbers only, `step` the global step."""
    step = row.get("trainer/global_step", row.get("_step"))
    out = {k: float(v) for k, v in row.items() if not k.startswith("_") and is_number(v)}
    out.pop("trainer/global_step", None)
    if is_number(step):
        out["step"] = float(step)
    return out
