"""Continuing a run: which checkpoint, and which W&B run.

Lightning's checkpoint holds the weights, optimizer, scheduler, loop counters and
(through `vitlab.data.samplers.ResumableDataLoader`) the data position;
`vitlab.training.callbacks.RNGState` adds the global RNG states. What is decided here:
the file a run continues from (`ckpt_path`, `resume=auto`), and the W&B run id of the
run folder, so that a resumed run appends to the same W&B run.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from vitlab.errors import ConfigError
from vitlab.runs.multirun import is_global_zero

WANDB_ID_FILE = "wandb_id"


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The most recently written checkpoint of the run folder, or None.

    Looks at `checkpoints/*.ckpt` (`last.ckpt`, the best `epoch_*.ckpt`, the one a
    signal wrote) and the `hpc_ckpt_*.ckpt` Lightning's SLURM environment writes to
    the run folder itself before it requeues a job.
    """
    folder = Path(run_dir)
    candidates = [*folder.glob("checkpoints/*.ckpt"), *folder.glob("hpc_ckpt_*.ckpt")]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def resolve_ckpt_path(ckpt_path: str | None, resume: str | bool | None, run_dir: str) -> str | None:
    """The checkpoint to start from, given `ckpt_path`, `resume` and the run folder.

    - `resume=auto`: the run folder's newest checkpoint if it has one (a requeued
      job continues itself, even a fine-tune that began from another file), else
      `ckpt_path` if given, else a fresh start.
    - `ckpt_path=last`: the run folder's newest checkpoint; an error if there is none.
    - `ckpt_path=<file>`: that file.
    """
    if resume not in (None, False, "auto"):
        raise ConfigError(f"resume={resume!r} is not an option; use resume=auto or leave it null")
    found = newest_checkpoint(run_dir) if resume == "auto" or ckpt_path == "last" else None
    if found is not None:
        return str(found)
    if ckpt_path == "last":
        raise ConfigError(
            f"ckpt_path=last, but the run folder {run_dir} holds no checkpoint "
            "(checkpoints/*.ckpt or hpc_ckpt_*.ckpt); name the run folder with run_dir=<folder>"
        )
    return str(ckpt_path) if ckpt_path else None


def wandb_run_id(run_dir: str | Path) -> str | None:
    """The W&B run id of this run folder: read from `<run>/wandb_id`, or made and written there.

    None on ranks above 0, which do not log to W&B (and must not race rank 0 to the file).
    """
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    if not is_global_zero():
        return None
    run_id = uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id
