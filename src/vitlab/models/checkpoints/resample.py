"""A file's patch embedding and position table resampled to the model they load into.

Two resizes of the learned table, each named for what it follows:

- `resample_posemb`, the original's fine-tuning at another resolution
  (`vit_jax/checkpoint.py`): the patch part resized bilinearly, the class token's row kept;
- with `flexi=True`, FlexiViT's, for a file of another patch size: big_vision's flexi
  model resizes its table so (`flexi.flexi_table_for`), and the kernel is
  PI-resized to the model's patch size (`resample_kernel`).
"""

from __future__ import annotations

import math

import torch

from vitlab.models.checkpoints.layout import _Link
from vitlab.models.flexi import flexi_table_for, resample_patch_embed
from vitlab.models.pos_embed import resize_learned_posemb
from vitlab.models.vit import VisionTransformer


def resample_posemb(
    model: VisionTransformer, posemb: torch.Tensor, target: torch.Tensor, flexi: bool = False
) -> torch.Tensor:
    """The file's (1, prefix + side², d) table resampled to `model`'s grid, shaped as `target`.

    `flexi`: the grid differs because the patch size does (FlexiViT's resize), not the
    resolution (the original's). Left as it is when it cannot be (not a square grid,
    another width), so that the fit check reports it as mis-shaped with both shapes.
    """
    prefix = model.num_prefix_tokens
    side = math.isqrt(posemb.shape[1] - prefix)
    if (
        posemb.ndim != 3
        or posemb.shape[2] != target.shape[2]
        or side * side != posemb.shape[1] - prefix
    ):
        return posemb
    if flexi:
        return flexi_table_for(model, posemb, torch.float32)
    return resize_learned_posemb(posemb.float(), prefix, (side, side), model.pos_embed.grid)


def resample_kernel(link: _Link, kernel: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The file's patch-embedding kernel PI-resized to the patch size of `target` (FlexiViT).

    Both in the file's layout, which `link` (the kernel's) converts to ours and back.
    Left as it is when more than the patch size differs (the channels), so that the fit
    check reports it.
    """
    ours, wanted = link.to_ours([kernel]), link.to_ours([target])
    if ours.shape[:2] != wanted.shape[:2]:
        return kernel
    resized = resample_patch_embed(ours.double(), tuple(wanted.shape[-2:])).float()
    return link.to_official(resized)[0]
