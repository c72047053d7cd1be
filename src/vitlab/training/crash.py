"""Save `last.ckpt` when training fails, so that a crash loses no finished step.

A corrupt image found mid-epoch, a full disk or a bug in a callback used to throw away
everything since the last periodic checkpoint. `CrashCheckpoint` saves the state after
the last completed optimizer step instead, as `<dirpath>/last.ckpt`, and adds a note to
the exception: which file, which step, and the command that resumes the run (the one
`GracefulStop` prints). Resuming from it is exact, as from a `GracefulStop` checkpoint.

The failure can come at any point after that step: in a later callback hook, in
validation, while fetching the next batch (after `trainer.fit_loop` has counted it as
ready), or in the next step's forward pass (after dropout has drawn from the global
RNG). So the callback keeps, at the end of each optimizer step, the two things such a
failure moves on: the loops' counters (`trainer.fit_loop.state_dict()`, a few small
dicts, which also give the data position) and the global RNG states. On a failure it
puts both back and saves: the file is the one `GracefulStop` would have written at
the end of that step, which Lightning resumes exactly (with the data position of
`vitlab.data.samplers.ResumableDataLoader`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from torch.optim import Optimizer

from vitlab.errors import Interrupted, NonFiniteLossError
from vitlab.training.callbacks import global_rng_states, set_global_rng_states
from vitlab.training.signals import LAST_CHECKPOINT, resume_command

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _StepState:
    """What a failure after step `global_step` moves on, taken at the end of that step."""

    global_step: int
    epoch: int
    loops: dict[str, Any]
    rng: dict[str, Any]


class CrashCheckpoint(L.Callback):
    """On an error during training, save `<dirpath>/last.ckpt` at the last completed step.

    Nothing is saved, and `last.ckpt` is left as it was, when:
    - the error is a `NonFiniteLossError` (the newest weights are suspect: they may be
      what made the loss NaN; the checkpoints before it are kept), `Interrupted`
      (`GracefulStop` has saved), or no `Exception` at all (KeyboardInterrupt, SystemExit);
    - no optimizer step has completed in this `fit`, or the error came after training
      ended (`on_train_end`, `trainer.test`): there is nothing newer than what is on disk;
    - the error came after the next step had begun updating the weights
      (`on_before_optimizer_step`, gradient clipping, `optimizer.step`): they may be
      part-updated, and undoing that would take a copy of the weights at every step;
      a note says so;
    - it runs on several processes (`trainer.world_size > 1`): a save is a collective
      that the other ranks, not failing, would never join; a note says so.

    Keep it first among the callbacks: it takes its snapshot in `on_train_batch_end`,
    and a callback whose `on_train_batch_end` runs before it and fails leaves the
    snapshot one step behind the weights (then it saves nothing, as above).

    Attributes:
        dirpath: Folder of the checkpoint; give the `ModelCheckpoint`'s folder
            (`<run>/checkpoints`) so that the file is the run's usual `last.ckpt`.
        overrides: The run's command-line overrides, repeated in the resume command;
            `vitlab.runs.build` passes Hydra's.
        checkpoint: The checkpoint written on the last failure, else None.
    """

    def __init__(self, dirpath: str, overrides: Sequence[str] = ()) -> None:
        self.dirpath = dirpath
        self.overrides = list(overrides)
        self.checkpoint: Path | None = None
        self._last_step: _StepState | None = None
        self._updating = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.checkpoint, self._last_step, self._updating = None, None, False

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer
    ) -> None:
        self._updating = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._updating = False
        last = self._last_step
        if last is not None and last.global_step == trainer.global_step:
            return  # a batch that only accumulated gradients: its state is not a step's
        self._last_step = _StepState(
            trainer.global_step,
            trainer.current_epoch,
            trainer.fit_loop.state_dict(),
            global_rng_states(),
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = None  # the run's own checkpoints hold its end

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        last, self._last_step = self._last_step, None
        if last is None or not isinstance(exception, Exception):
            return
        if isinstance(exception, (NonFiniteLossError, Interrupted)):
            return
        path = Path(self.dirpath) / LAST_CHECKPOINT
        why_not = self._why_not_save(trainer, last)
        if why_not is None:
            try:
                self._save(trainer, last, path)
            except Exception as err:  # what failed (a full disk) may stop the save too
                why_not = f"saving {path} failed too ({type(err).__name__}: {err})"
        resume = f"resume with: {resume_command(path, self.overrides)}"
        note = (
            f"Saved {path} at step {last.global_step} (epoch {last.epoch}); {resume}"
            if why_not is None
            else f"Saved no checkpoint: {why_not}. From the newest one on disk, {resume}"
        )
        log.warning(note)
        # What `exception.add_note(note)` does (Python 3.11), also on 3.10.
        exception.__notes__ = [*getattr(exception, "__notes__", ()), note]

    def _why_not_save(self, trainer: L.Trainer, last: _StepState) -> str | None:
        """Why the state after step `last` cannot be saved now, or None if it can."""
        if trainer.world_size > 1:
            return (
                f"with {trainer.world_size} processes a save needs all of them, "
                "and the others may still be training"
            )
        if self._updating or trainer.global_step != last.global_step:
            return (
                f"the failure came after step {last.global_step + 1} had begun updating the weights"
            )
        return None

    def _save(self, trainer: L.Trainer, last: _StepState, path: Path) -> None:
        """Put the loops and the RNGs back to the end of step `last`, then save `path`."""
        trainer.fit_loop.load_state_dict(last.loops)
        set_global_rng_states(last.rng)
        trainer.save_checkpoint(path)
        self.checkpoint = path
