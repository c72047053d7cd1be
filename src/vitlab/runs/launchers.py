"""What vitlab's submitit launchers (`hydra/launcher=slurm`, `hydra/launcher=submitit_local`) add.

The launcher classes live in `hydra_plugins.vitlab_launchers`, where Hydra looks for
plugins; this module holds what they do. hydra-submitit-launcher pickles the sweep
and composes each job's config again in the job's own process: on a SLURM node, in a
local subprocess, and once more each time SLURM requeues the job. So:

- The multirun folder is resolved once, at submission. It is `${vitlab.unique:...}`,
  and resolved again in a new process, where the folder already exists, it would
  become `<folder>_2`: every job, every rank and every restart would write elsewhere.
  `pin_sweep_dir` makes the folder resolved at submission a literal override of every
  job, so job `n` always writes to `<multirun folder>/<n>`, also after a requeue.
- Every job runs with `resume=auto`: a fresh start the first time, and a continuation
  from the newest checkpoint of its folder when a requeued job starts again (unless
  the command line sets `resume` itself).
- The launcher starts one process per device (`tasks_per_node = trainer.devices`) and
  Lightning takes them as its ranks instead of starting its own. On SLURM, Lightning
  reads SLURM's variables (`SLURM_PROCID`, ...); the local executor has no such
  variables for Lightning, so each local task exports the ones Lightning reads
  (`LOCAL_RANK`, `NODE_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, and `RANK`).

The requeue signal belongs to Lightning's `SLURMEnvironment`: `conf/hydra/launcher/slurm.yaml`
asks SLURM for SIGUSR1 before the time limit, on which Lightning saves
`<job>/hpc_ckpt_<n>.ckpt` and runs `scontrol requeue`; SLURM's SIGTERM that follows
makes `vitlab.training.signals.GracefulStop` save `checkpoints/last.ckpt`. Submitit's handler,
which would requeue without saving anything and exit mid-step, listens to SIGUSR2,
which SLURM is not asked to send.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, open_dict, read_write

# What every job runs with: a requeued job starts again in its folder and continues there.
REQUEUE_OVERRIDES = ("++resume=auto",)
# Ports for the local tasks' process group: one per job, from the job id (a process id).
_LOCAL_PORT_BASE, _LOCAL_PORT_RANGE = 20000, 20000


def pin_sweep_dir(config: DictConfig) -> str:
    """Resolve `hydra.sweep.dir` now and make it a literal override of every job of the sweep.

    A job's config is composed again from the sweep's Hydra overrides
    (`ConfigLoader.load_sweep_config`), so the folder goes into those overrides as well as
    into `config`. Returns the folder.
    """
    sweep_dir = str(config.hydra.sweep.dir)
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.sweep.dir = sweep_dir
        overrides = [
            o for o in config.hydra.overrides.hydra if not o.startswith("hydra.sweep.dir=")
        ]
        config.hydra.overrides.hydra = [*overrides, f"hydra.sweep.dir={_quoted(sweep_dir)}"]
    return sweep_dir


def with_requeue_overrides(overrides: Sequence[str]) -> list[str]:
    """A job's overrides plus `REQUEUE_OVERRIDES`, except keys the command line already sets."""
    given = {_override_key(o) for o in overrides}
    return [*overrides, *(o for o in REQUEUE_OVERRIDES if _override_key(o) not in given)]


def export_local_ranks(job_env: Any) -> None:
    """Export, for Lightning, the rank of this task of a local submitit job.

    `job_env` is `submitit.JobEnvironment()` of the task. With `LOCAL_RANK` set,
    Lightning's `LightningEnvironment` takes the processes as started externally, as it
    does with SLURM's, and the tasks of one job meet at `127.0.0.1:<port of the job>`.
    `RANK` is for code that asks for its rank before the Trainer exists (as
    `SLURM_PROCID` is on SLURM).
    """
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_LOCAL_PORT_BASE + int(job_env.job_id) % _LOCAL_PORT_RANGE),
        NODE_RANK=str(job_env.node),
        LOCAL_RANK=str(job_env.local_rank),
        RANK=str(job_env.global_rank),
        WORLD_SIZE=str(job_env.num_tasks),
    )


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _quoted(value: str) -> str:
    """`value` as a quoted string of Hydra's override grammar (paths may hold `=`, `,`, spaces)."""
    return "'" + value.replace("'", "\\'") + "'"
