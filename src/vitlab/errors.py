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


def exit_with(err: VitlabError) -> NoReturn:
    """Print `err` alone and exit with status 2; with HYDRA_FULL_ERROR=1 raise it instead.

    For the places where Hydra, not vitlab, would report the error (it prints a
    traceback), such as a resolver refusing a run folder.
    """
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"\nError: {err}\n(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
    raise SystemExit(2)
