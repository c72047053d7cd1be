"""Our models written in the official layout, for the original code and timm's npz reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from vitlab.models.checkpoints.layout import official_tensors


def to_official(model: nn.Module) -> dict[str, np.ndarray]:
    """A ViT, hybrid or Mixer as official float32 arrays, named as in the published `.npz` files.

    The inverse of `load_pretrained`: `np.savez(path, **to_official(model))` writes a
    file the original code (and timm's npz loader) reads. Hybrid GroupNorm
    parameters come out (C,), as the current Flax code holds them.
    """
    return {
        name: t.detach().to("cpu", torch.float32).numpy()
        for name, t in official_tensors(model).items()
    }


def save_official_npz(model: nn.Module, path: str | Path) -> Path:
    """Write `to_official(model)` to `path` as an uncompressed `.npz`; returns the path."""
    path = Path(path)
    np.savez(path, **to_official(model))
    return path
