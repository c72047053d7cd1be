"""Hydra multirun support: each job's status on disk, and a sweep that reports its failures.

A failed job must not stop the sweep (the other jobs still run) and must not be
lost (its folder says why it failed). `record_status` writes `<job>/status.json`
for every run, single or multirun; `SweepSummary`, a Hydra callback, reads them
when the sweep ends, prints one line per failed job and exits non-zero if any failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

STATUS_FILE = "status.json"


def is_multirun() -> bool:
    """True inside a job of `python src/train.py -m ...`."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_overrides() -> list[str]:
    """The command-line overrides of this job (`["model.patch_size=8", ...]`), [] outside Hydra."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def sweep_id() -> str | None:
    """The multirun folder's name (`2026-11-22_03-40-00`): one id shared by the jobs of a sweep."""
    return Path(HydraConfig.get().sweep.dir).name if is_multirun() else None


def record_status(output_dir: str | Path, status: str, error: str | None = None) -> None:
    """Write `<output_dir>/status.json`: completed or failed, the error, the job's overrides."""
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"status": status, "error": error, "overrides": job_overrides()}
    (path / STATUS_FILE).write_text(json.dumps(record, indent=2) + "\n")


class SweepSummary(Callback):
    """Create the multirun folder up front; at the end, list failed jobs and exit non-zero."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Sweepers may keep state there before any job runs (Optuna's sqlite storage).
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        statuses = sorted(
            sweep_dir.glob(f"*/{STATUS_FILE}"), key=lambda p: _job_number(p.parent.name)
        )
        failed = [(p.parent, json.loads(p.read_text())) for p in statuses]
        failed = [(job, s) for job, s in failed if s["status"] != "completed"]
        print(
            f"\nSweep {sweep_dir}: {len(statuses) - len(failed)} of {len(statuses)} jobs completed"
        )
        if failed:
            for job, status in failed:
                print(
                    f"  FAILED job {job.name} ({' '.join(status['overrides'])}): {status['error']}",
                    file=sys.stderr,
                )
            raise SystemExit(1)


def _job_number(name: str) -> int:
    return int(name) if name.isdigit() else -1
