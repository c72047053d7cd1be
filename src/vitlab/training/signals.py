"""Stop training cleanly on SIGTERM or SIGINT, leaving a checkpoint to resume from.

A scheduler's SIGTERM (preemption, `scancel`, a time limit) or a Ctrl+C should not
throw away the epoch in progress. `GracefulStop` turns the signal into a flag; at
the next step boundary it writes `<dirpath>/last.ckpt` (the run's usual latest
checkpoint) and raises `Interrupted` out of `fit`: nothing runs after the save (no
validation, no other checkpoint overwriting it), which keeps a preempted job within
its grace period. The message names the command that continues the run in its own folder
(`run_dir=<run> ckpt_path=last`), from that very step. The run exits non-zero (128 + the signal's
number, as a shell reports a process killed by it) instead of looking finished.

Lightning 2.x installs its own SIGTERM handler when `fit` starts; on a plain run it
ends the fit with `SIGTERMException`, an exit status of 0 and no checkpoint. This
callback therefore takes SIGTERM and SIGINT over for the training loop itself
(`on_train_start` .. `on_train_end`, after Lightning has registered its handler)
and hands them back afterwards. SIGUSR1, which Lightning's SLURM environment uses
to requeue, is left alone. A second signal while the first is pending gets the
handler that was there before (Lightning's, or Python's KeyboardInterrupt): press
Ctrl+C twice to stop at once, without a checkpoint.
"""

from __future__ import annotations

import logging
import shlex
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from vitlab.errors import Interrupted

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
LAST_CHECKPOINT = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
_RESUME_KEYS = ("ckpt_path=", "run_dir=", "resume=", "hydra.run.dir=")


class GracefulStop(L.Callback):
    """On SIGTERM or SIGINT, save `<dirpath>/last.ckpt` at the next step boundary and raise `Interrupted`.

    Attributes:
        dirpath: Folder of the checkpoint; give the `ModelCheckpoint`'s folder
            (`<run>/checkpoints`) so that the file is the run's usual `last.ckpt`.
        interrupted_by: The signal's name (`"SIGTERM"`) if one stopped training, else None.
        checkpoint: The checkpoint written on the signal, else None.
        message: The one-line report (signal, step, checkpoint, how to resume), else None.
        overrides: The run's command-line overrides (`["model=vit_s16", ...]`), repeated in
            the resume command; `vitlab.runs.build` passes Hydra's.
    """

    def __init__(self, dirpath: str, overrides: Sequence[str] = ()) -> None:
        self.dirpath = dirpath
        self.overrides = list(overrides)
        self.interrupted_by: str | None = None
        self.checkpoint: Path | None = None
        self.message: str | None = None
        self._received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._received = None
        self.interrupted_by = self.checkpoint = self.message = None
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._received is None:
            self._received = signal.Signals(signum)
            log.warning(
                "Received %s: stopping after this step (send it again to stop at once).",
                self._received.name,
            )
            return
        previous = self._previous.get(signal.Signals(signum))
        self._restore_handlers()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.raise_signal(signum)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._stop_if_signalled(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_signalled(trainer)  # a signal after the last step still gets its checkpoint
        self._restore_handlers()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        received = self._received is not None and self.checkpoint is None
        if trainer.world_size > 1:  # every rank must stop at the same step
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        name = self._received.name if self._received is not None else "SIGTERM"
        path = Path(self.dirpath) / LAST_CHECKPOINT
        trainer.save_checkpoint(path)
        self.interrupted_by, self.checkpoint = name, path
        self.message = (
            f"Stopped by {name} at step {trainer.global_step}; checkpoint: {path}. "
            f"Resume with: {resume_command(path, self.overrides)}"
        )
        log.warning(self.message)
        raise Interrupted(self.message, self._received or signal.SIGTERM)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


def resume_command(checkpoint: Path, overrides: Sequence[str]) -> str:
    """The run's command line (`overrides`), continued from `checkpoint`, in its run folder if it has one.

    The keys that chose where the run started (`ckpt_path`, `run_dir`, `resume`,
    `hydra.run.dir`) are dropped: the command names its own.
    """
    where = (
        [f"run_dir={checkpoint.parent.parent}", "ckpt_path=last"]
        if checkpoint.parent.name == "checkpoints"
        else [f"ckpt_path={checkpoint}"]
    )
    keep = (o for o in overrides if not o.lstrip("+").startswith(_RESUME_KEYS))
    return shlex.join(["python", "src/train.py", *keep, *where])
