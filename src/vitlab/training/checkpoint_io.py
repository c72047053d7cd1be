"""Checkpoint writes that a kill cannot truncate: a temp file beside the target, then a rename.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction whose temp file
lives in the system temp folder; committing it to the run folder is then a copy
across file systems, and a process killed during that copy (preemption, OOM
killer, `scancel`) leaves a truncated `last.ckpt` behind, which is exactly the
file a resume reaches for. Here the temp file is in the target's own folder and
`os.replace` swaps it in in one step: the target is always the old file or the new one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves are atomic (remote URLs keep Lightning's path)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} takes no storage_options, got {storage_options!r}"
            )
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(temp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
        return None
