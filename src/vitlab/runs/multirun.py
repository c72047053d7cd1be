"""Hydra multirun support: each job's status on disk, and a sweep that reports its failures.

A failed job must not stop the sweep (the other jobs still run) and must not be
lost (its folder says why it failed). `record_status` writes `<job>/status.json`
for every run, single or multirun; `SweepSummary`, a Hydra callback, reads them
when the sweep ends, prints one line per failed job and exits non-zero if any failed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import DictConfig

STATUS_FILE = "status.json"
# Set to the job's folder while a multirun job runs, and so inherited by the DDP ranks that
# Lightning starts for it (`vitlab.training.distributed.MultirunRanks`); those run in Hydra's RUN mode.
MULTIRUN_JOB_ENV = "VITLAB_MULTIRUN_JOB"


def is_multirun() -> bool:
    """True inside a job of `python src/train.py -m ...`, in each of its DDP ranks.

    A job's ranks fail as a multirun job fails (logged, recorded by rank 0, the
    process ends normally) rather than with an error status: Lightning's launcher
    kills rank 0, here the whole sweep, when another rank exits with one.
    """
    if os.environ.get(MULTIRUN_JOB_ENV):
        return True
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_overrides() -> list[str]:
    """The command-line overrides of this job (`["model.patch_size=8", ...]`), [] outside Hydra."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def sweep_id() -> str | None:
    """The multirun folder's name (`2026-11-22_03-40-00`): one id shared by the jobs of a sweep."""
    return Path(HydraConfig.get().sweep.dir).name if is_multirun() else None


def is_global_zero() -> bool:
    """False in DDP ranks other than 0; True in a single process.

    Reads the rank Lightning keeps on `rank_zero_only` (from RANK / LOCAL_RANK /
    SLURM_PROCID when lightning is imported, then from the strategy), without
    importing lightning here: `vitlab.reports.runs` uses this module.
    """
    return getattr(rank_zero_only, "rank", 0) == 0


def record_status(output_dir: str | Path, status: str, error: str | None = None) -> None:
    """Write `<output_dir>/status.json`: completed or failed, the error, the job's overrides.

    Only global rank 0 writes: the other DDP ranks run in the same folder.
    """
    if not is_global_zero():
        return
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
