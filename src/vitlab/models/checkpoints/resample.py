"""A file's learned position table resampled to the patch grid of the model it loads into.

The original's fine-tuning at another resolution (`vit_jax/checkpoint.py`): the
patch part of the table is resized bilinearly, the class token's row kept.
"""

from __future__ import annotations

import math

import torch

from vitlab.models.pos_embed import resize_learned_posemb
from vitlab.models.vit import VisionTransformer


def resample_posemb(
    model: VisionTransformer, posemb: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """The file's (1, prefix + side², d) table resampled to `model`'s grid, shaped as `target`.

    Left as it is when it cannot be (not a square grid, another width), so that the
    fit check reports it as mis-shaped with both shapes.
    """
    prefix = model.num_prefix_tokens
    side = math.isqrt(posemb.shape[1] - prefix)
    if (
        posemb.ndim != 3
        or posemb.shape[2] != target.shape[2]
        or side * side != posemb.shape[1] - prefix
    ):
        return posemb
    return resize_learned_posemb(posemb.float(), prefix, (side, side), model.pos_embed.grid)
