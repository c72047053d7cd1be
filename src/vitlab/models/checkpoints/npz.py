"""Reading official checkpoint files: an `.npz` path, or a mapping of arrays, as tensors.

Two spellings of the same parameters are accepted: the pre-Linen training code nests
them under `opt/target/`, and the published hybrid files store GroupNorm scale and
bias as (1, 1, 1, C) where the current Flax code holds (C,) (flax#1721).
"""

from __future__ import annotations

import re
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from vitlab.errors import CheckpointError

Source = str | Path | Mapping[str, np.ndarray]

OFFICIAL_PREFIX = "opt/target/"
_GROUP_NORM_PARAM = re.compile(r"(^|/)gn(\d+|_root|_proj)/(scale|bias)$")


def read_official(source: Source) -> tuple[str, dict[str, torch.Tensor]]:
    """(a label naming the source for messages, its arrays as tensors under their official names).

    The `opt/target/` prefix is dropped and GroupNorm parameters come out (C,).
    Raises CheckpointError naming the path when it is missing or not an `.npz` archive.
    """
    if isinstance(source, Mapping):
        label, arrays = "the given checkpoint (a mapping of arrays)", dict(source)
    else:
        path = Path(source).expanduser()
        label = str(path)
        if not path.is_file():
            raise CheckpointError(
                f"pretrained checkpoint {path} does not exist or is not a file "
                f"(resolved: {path.resolve()})"
            )
        arrays = _npz_arrays(path)
    if any(name.startswith(OFFICIAL_PREFIX) for name in arrays):
        arrays = {
            n.removeprefix(OFFICIAL_PREFIX): a
            for n, a in arrays.items()
            if n.startswith(OFFICIAL_PREFIX)
        }
    tensors = {}
    for name, array in arrays.items():
        tensor = torch.as_tensor(np.asarray(array))
        if _GROUP_NORM_PARAM.search(name) and tensor.ndim == 4:
            tensor = rearrange(tensor, "1 1 1 c -> c")
        tensors[name] = tensor
    return label, tensors


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the `.npz` archive at `path`, by name; CheckpointError if it is none."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise CheckpointError(
            f"pretrained checkpoint {path} is not a readable .npz archive "
            f"({type(error).__name__}: {error}); is it truncated, or another format?"
        ) from error
    raise CheckpointError(
        f"pretrained checkpoint {path} holds a single .npy array, not an .npz archive of named parameters"
    )
