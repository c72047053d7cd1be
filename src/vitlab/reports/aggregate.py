"""Jobs that differ only in `seed` or `data.fold` as one group: the mean ± std of its repeats.

A sweep that repeats each configuration (`seed=1,2,3`, or the folds of a cross-validation)
is read as groups, one per value of the other varied keys. A group's metric is a `Summary`
over its completed runs that have the metric: failed runs and runs without it do not count
in its `n`. Without a repeat key every run is a group of its own, so the plots treat both
kinds of sweep alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vitlab.reports.runs import Run, float_or_none, job_order
from vitlab.reports.table import (
    Comparison,
    Summary,
    higher_is_better,
    metric_columns,
    throughput_of,
    varied_keys,
)

# The override keys whose values repeat a configuration rather than change it.
REPEAT_KEYS = ("seed", "data.fold")


@dataclass
class Group:
    """The runs of one configuration: one run, or its repeats over seeds or folds.

    Attributes:
        runs: the runs, in the order given, failed ones included.
        values: the group keys (the varied keys but the repeat keys) -> their override value.
    """

    runs: list[Run]
    values: dict[str, str | None]

    @property
    def name(self) -> str:
        """The jobs in job order, `0,3,6`, however the runs were sorted."""
        return ",".join(sorted((run.name for run in self.runs), key=job_order))

    @property
    def label(self) -> str:
        """`job 3: 8, learned`, or `jobs 0,3,6: 8, learned` for repeats."""
        values = ", ".join("" if value is None else value for value in self.values.values())
        jobs = f"job{'s' if len(self.runs) > 1 else ''} {self.name}"
        return f"{jobs}: {values}" if values else jobs

    def value(self, key: str) -> Any:
        """A config key's value (`Run.value`), which the group's runs share unless it is a repeat key."""
        return self.runs[0].value(key)

    def summary(self, metric: str) -> Summary:
        """`metric` over the completed runs that have it."""
        values = [float_or_none(run.metrics.get(metric)) for run in self.runs if not run.failed]
        return Summary.of([value for value in values if value is not None])

    def throughput(self) -> Summary:
        """Images/s (`throughput_of`: training's, else the test loop's) over the completed runs."""
        speeds = [throughput_of(run) for run in self.runs if not run.failed]
        return Summary.of([speed[1] for speed in speeds if speed])


def repeat_keys(varied: Sequence[str]) -> list[str]:
    """The varied keys that repeat a configuration (`REPEAT_KEYS`), in the order given."""
    return [key for key in varied if key in REPEAT_KEYS]


def group_runs(runs: Sequence[Run], varied: Sequence[str]) -> list[Group]:
    """The runs by the values of their varied keys other than `seed`/`data.fold`, groups in
    first-seen order; a group per run when no repeat key varies (identical runs stay apart)."""
    keys = [key for key in varied if key not in REPEAT_KEYS]
    if not repeat_keys(varied):
        return [Group([run], {key: run.overrides.get(key) for key in keys}) for run in runs]
    groups: dict[tuple[str | None, ...], Group] = {}
    for run in runs:
        values = {key: run.overrides.get(key) for key in keys}
        groups.setdefault(tuple(values.values()), Group([], values)).runs.append(run)
    return list(groups.values())


def sort_groups(groups: Sequence[Group], metric: str) -> list[Group]:
    """Best mean of `metric` first; groups with no run that has it last."""

    def key(group: Group) -> tuple[bool, float]:
        mean = group.summary(metric).mean
        if mean is None:
            return True, math.inf
        return False, -mean if higher_is_better(metric) else mean

    return sorted(groups, key=key)


def mean_table(runs: Sequence[Run], metric: str) -> Comparison | None:
    """A row per group, best mean of `metric` first: its jobs, group keys, `n` (the runs that
    count for `metric`), and a `Summary` per final metric and throughput. None when neither
    `seed` nor `data.fold` varies: then the per-job table says it all."""
    varied = varied_keys(runs)
    if not repeat_keys(varied):
        return None
    groups = sort_groups(group_runs(runs, varied), metric)
    keys = list(groups[0].values)
    metrics = metric_columns(runs, metric)
    rows = [
        {
            "jobs": group.name,
            **group.values,
            "n": group.summary(metric).n,
            **{m: group.summary(m) for m in metrics},
        }
        for group in groups
    ]
    return Comparison(columns=["jobs", *keys, "n", *metrics], rows=rows)
