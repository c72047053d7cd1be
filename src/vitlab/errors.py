"""The one exception type users see without a traceback.

Anything that is the user's mistake (a bad config value, missing data, a file
that is not a checkpoint) raises `VitlabError` with a message that names the
key or file, the bad value and what would be valid. The entry points print
that message alone and exit non-zero; `HYDRA_FULL_ERROR=1` shows the traceback.
"""

import os
import sys
from typing import NoReturn


class VitlabError(Exception):
    """A user-facing error: the message is the whole report."""


class ConfigError(VitlabError, ValueError):
    """A config value that cannot work, found before training starts."""


class DataError(VitlabError, FileNotFoundError):
    """A dataset that is missing, empty or unreadable."""


class CheckpointError(VitlabError, ValueError):
    """A checkpoint or pretrained file that is missing, corrupt or of another architecture."""


class NonFiniteLossError(VitlabError, FloatingPointError):
    """The training loss became NaN or Inf: the run stops rather than train on garbage."""


class ExportCheckError(VitlabError):
    """An exported model does not compute what the PyTorch model does (`vitlab.deploy.export`):
    nothing usable is kept, and the message gives the numbers."""


class Interrupted(VitlabError):
    """Training was stopped by a signal after saving a checkpoint; the message says how to resume.

    `exit_code` is 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), the
    status a shell or scheduler expects of a process that a signal ended.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def exit_with(err: VitlabError) -> NoReturn:
    """Print `err` (and its notes, e.g. a crash checkpoint's resume command) and exit with status 2; with HYDRA_FULL_ERROR=1 raise it instead.

    For the places where Hydra, not vitlab, would report the error (it prints a
    traceback), such as a resolver refusing a run folder.
    """
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    notes = "".join(f"\n{note}" for note in getattr(err, "__notes__", ()))
    print(f"\nError: {err}{notes}\n(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
    raise SystemExit(2)
