"""The last line of defence: an exception nobody turned into a `VitlabError` still gets one line.

The line names the exception, its message and, where the traceback shows it, the
config key whose code raised it (`data`, `model`, ...); the exception's notes follow
(e.g. the crash checkpoint's resume command). The traceback goes to the run's log
file (Hydra's `<run>/<task>.log`), not to the terminal; `HYDRA_FULL_ERROR=1` keeps
Python's usual report.
"""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

log = logging.getLogger(__name__)

# Where a frame's file lives -> the config key whose code that is. Innermost frames win.
KEYS_BY_PATH = (
    ("vitlab/data/", "data"),
    ("vitlab/models/", "model"),
    ("vitlab/training/optim", "optimizer/scheduler"),
    ("torch/optim/", "optimizer"),
    ("vitlab/training/callbacks", "callbacks"),
    ("vitlab/training/signals", "callbacks"),
    ("vitlab/training/crash", "callbacks"),
    ("lightning/pytorch/callbacks/", "callbacks"),
    ("vitlab/training/loggers", "logger"),
    ("lightning/pytorch/loggers/", "logger"),
    ("torchvision/", "data"),
    ("PIL/", "data"),
)


def key_of(err: BaseException) -> tuple[str, str] | None:
    """The config key whose code raised `err`, and the innermost frame there (`file:line`), if known."""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        filename = frame.filename.replace("\\", "/")
        for fragment, key in KEYS_BY_PATH:
            if fragment in filename:
                return key, f"{Path(filename).name}:{frame.lineno}"
    return None


def one_line(err: BaseException) -> str:
    """`Type: message`, where it came from when known, then the exception's notes, one per line."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    line = f"{type(err).__name__}: {message}" if message else type(err).__name__
    where = key_of(err)
    if where is not None:
        line += f" (raised by the code of `{where[0]}`, {where[1]})"
    return "\n".join([line, *getattr(err, "__notes__", ())])


def log_traceback(err: BaseException) -> list[str]:
    """Write `err`'s traceback to the root logger's log files only; return their paths."""
    record = log.makeRecord(
        log.name, logging.ERROR, __file__, 0, "Traceback of the failure:", (), None
    )
    record.exc_info = (type(err), err, err.__traceback__)
    files = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename != os.devnull:
            handler.handle(record)
            files.append(handler.baseFilename)
    return files
