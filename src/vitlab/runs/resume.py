"""Continuing a run: which checkpoint, which folder, and the state Lightning does not save.

Lightning's checkpoint holds the weights, optimizer, scheduler, loop counters and
(through `vitlab.data.samplers.ResumableDataLoader`) the data position. Two things
are added here: the global RNG states at the last finished step (`RNGState`), so
that dropout continues the same stream, and the W&B run id of the run folder, so
that a resumed run appends to the same W&B run.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from vitlab.errors import ConfigError, exit_with
from vitlab.runs.multirun import is_global_zero

WANDB_ID_FILE = "wandb_id"


class RNGState(Callback):
    """Save the global RNG states in every checkpoint; restore them when training resumes.

    Between a training step and the checkpoint written after it nothing draws from
    the global RNG: validation runs in eval mode, and vitlab's loaders draw order
    and augmentation from their own seeds (`vitlab.data.samplers`). So the states at
    saving time are those the next step would have used. They are stored as plain
    tensors and lists, so checkpoints still load with `weights_only=True`.
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["rng_state"] = _capture()

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._to_restore = checkpoint.get("rng_state")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._to_restore is not None:
            _restore(self._to_restore)
            self._to_restore = None


def _capture() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_folder(run_dir: str | None, fresh: str) -> str:
    """`hydra.run.dir`: the folder named by `run_dir=` (to resume it), else `fresh`."""
    return str(run_dir) if run_dir else fresh


def config_subdir(output_dir: str, resume: str | bool | None, ckpt_path: str | None) -> str | None:
    """`hydra.output_subdir`: `.hydra` for a new run folder, `.hydra/resume_<n>` when resuming one,
    none on ranks above 0.

    A folder that already holds a run (its `.hydra/config.yaml`) may only be written
    to by a run that resumes it (`resume=auto` or a `ckpt_path`): anything else would
    mix two runs' checkpoints and logs. This runs while Hydra sets up the folder,
    before it writes anything, so the refused run leaves the old one untouched.
    """
    if not is_global_zero():  # srun / torchrun ranks: rank 0 records the config
        return None
    folder = Path(output_dir)
    if not (folder / ".hydra" / "config.yaml").is_file():
        return ".hydra"
    if not (resume == "auto" or ckpt_path):
        exit_with(
            ConfigError(
                f"the run folder {folder} already holds a run; to continue it add resume=auto "
                "(or ckpt_path=last), or pick a new folder (leave run_dir and hydra.run.dir unset "
                "for a fresh dated one)"
            )
        )
    n = 2
    while (folder / ".hydra" / f"resume_{n}").exists():
        n += 1
    return f".hydra/resume_{n}"


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
