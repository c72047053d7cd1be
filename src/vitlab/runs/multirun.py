"""Hydra multirun support: each job's status on disk, a sweep that reports its failures,
and DDP ranks that run their own job.

A failed job must not stop the sweep (the other jobs still run) and must not be
lost (its folder says why it failed). `record_status` writes `<job>/status.json`
for every run, single or multirun; `SweepSummary`, a Hydra callback, reads them
when the sweep ends, prints one line per failed job and exits non-zero if any failed.

`MultirunRanks` fixes how Lightning starts DDP ranks inside `python src/train.py -m`.
Lightning's launcher (`_SubprocessScriptLauncher`) starts rank 1, 2, ... as
`python <sys.argv> hydra.run.dir=<HydraConfig.get().run.dir> hydra.output_subdir=null`.
Inside a multirun that argv holds `-m` and the whole sweep, and `run.dir` is not the
job's folder: every rank would run its own nested sweep, and under Optuna would
train different hyperparameters. For the duration of each job this Hydra callback
makes the argv this job's overrides alone (`hydra.mode=RUN`) and `run.dir` the job's
folder, so the ranks compose exactly the job's config and write where rank 0 writes.
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
from omegaconf import DictConfig, read_write

STATUS_FILE = "status.json"
# Set to the job's folder while a multirun job runs, and so inherited by the DDP ranks that
# Lightning starts for it (`MultirunRanks`); those run in Hydra's RUN mode.
MULTIRUN_JOB_ENV = "VITLAB_MULTIRUN_JOB"
# Set by Lightning's launcher in rank 0's own environment when it starts the other ranks.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Hydra overrides a rank must not inherit: the mode (the rank runs one job), and what
# Lightning appends itself.
_NOT_FOR_RANKS = ("hydra.mode=", "hydra.run.dir=", "hydra.output_subdir=", "hydra.job.name=")


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


def config_choice(group: str) -> str | None:
    """The option Hydra composed for a config group (`model` -> "vit_s16"); None outside Hydra."""
    if not HydraConfig.initialized():
        return None
    choice = HydraConfig.get().runtime.choices.get(group)
    return str(choice) if choice else None


def sweep_id() -> str | None:
    """The multirun folder's name (`2026-11-22_03-40-00`): one id shared by the jobs of a sweep."""
    return Path(HydraConfig.get().sweep.dir).name if is_multirun() else None


def is_global_zero() -> bool:
    """False in DDP ranks other than 0; True in a single process.

    Reads the rank Lightning keeps on `rank_zero_only` (from RANK / LOCAL_RANK /
    SLURM_PROCID when lightning is imported, then from the strategy), without
    importing lightning here: `vitlab.reports` uses this module.
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


def rank_argv(config: DictConfig) -> list[str]:
    """The command-line arguments that make a new process compose this job's config alone.

    The job's task overrides (the sweep's choice for it included: grid values, Optuna's
    suggestions), the command line's Hydra overrides except the mode and what Lightning
    appends itself (sweeper settings are inert in a single run), and `hydra.mode=RUN`,
    which also beats a `hydra.mode: MULTIRUN` set by a `sweep/` config.
    """
    hydra_overrides = [o for o in config.hydra.overrides.hydra if not o.startswith(_NOT_FOR_RANKS)]
    return [*config.hydra.overrides.task, *hydra_overrides, "hydra.mode=RUN"]


class MultirunRanks(Callback):
    """Hydra callback: DDP ranks started during a multirun job run that job, in its folder.

    At the job's start, `sys.argv` becomes `<script> <rank_argv>` and `hydra.run.dir`
    the job's output folder; Lightning builds the other ranks' command line from both.
    `VITLAB_MULTIRUN_JOB` tells those ranks that they belong to a multirun job
    (`is_multirun`), so that a failure ends the job, not the sweep.
    At the job's end it restores `sys.argv`, tears down the process group and removes
    the variables the launcher set (`LOCAL_RANK`, `MASTER_PORT`, ...): with them left
    in place, the next job's Trainer would take the processes as started externally
    and wait for ranks that never come. Outside a multirun it does nothing.
    """

    def __init__(self) -> None:
        self._argv: list[str] | None = None
        self._environ: dict[str, str | None] = {}
        self._had_process_group = False

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        self._argv = list(sys.argv)
        self._environ = {key: os.environ.get(key) for key in (*LAUNCHER_ENV, MULTIRUN_JOB_ENV)}
        self._had_process_group = _process_group_initialized()
        sys.argv = [sys.argv[0], *rank_argv(config)]
        os.environ[MULTIRUN_JOB_ENV] = str(config.hydra.runtime.output_dir)
        with read_write(config.hydra):
            config.hydra.run.dir = config.hydra.runtime.output_dir
        # HydraConfig holds a copy of the hydra node, made when the job started.
        HydraConfig.instance().set_config(config)

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._argv is None:
            return
        sys.argv, self._argv = self._argv, None
        if _process_group_initialized() and not self._had_process_group:
            import torch.distributed

            torch.distributed.destroy_process_group()
        for key, value in self._environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _process_group_initialized() -> bool:
    # torch is imported here, not with the module: `vitlab.reports` reads STATUS_FILE.
    import torch.distributed

    return torch.distributed.is_available() and torch.distributed.is_initialized()
