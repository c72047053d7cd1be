"""Checkpoints in other layouts than ours: the official `.npz` files, read and written."""

from vitlab.models.checkpoints.official import (
    from_official_npz,
    load_pretrained,
    save_official_npz,
    to_official,
)

__all__ = ["from_official_npz", "load_pretrained", "save_official_npz", "to_official"]
