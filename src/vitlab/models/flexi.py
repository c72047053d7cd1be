"""FlexiViT (Beyer et al., 2023): one ViT for every patch size.

big_vision's flexi model (`big_vision/models/proj/flexi/vit.py`) stores one
patch-embedding kernel and one position table, at the sizes it was built with, and
resamples both on the fly to the patch size of each call:

- the kernel by the pseudo-inverse resize, "PI-resize" (`resample_patch_embed`):
  the kernel w' for which <resize(x), w'> = <x, w> for every patch x, so a model whose
  image and kernel are both resized computes what it computed before;
- the position table bilinearly, antialiased when it shrinks (`resample_flexi_pos_embed`),
  as `jax.image.resize(..., "linear")` does. This is not the original ViT's fine-tuning
  resize (`pos_embed.resize_learned_posemb`), which stays the one for other resolutions.

Training draws the patch size of each step (`draw_patch_size`); a checkpoint stored
at one patch size loads into a model built at another (`state_dict_at_patch_size`).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import MutableMapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# numpy's default cut-off of `np.linalg.pinv`, which big_vision calls: singular values up to
# this share of the largest count as zero.
PINV_RTOL = 1e-15
StateDict = MutableMapping[str, torch.Tensor]


def resample_patch_embed(
    weight: torch.Tensor, new_patch_size: int | tuple[int, int]
) -> torch.Tensor:
    """A patch-embedding kernel (out, in, p, q) PI-resized to (out, in, p', q'), as big_vision's
    `resample_patchemb`.

    The resize it inverts is big_vision's, `tf.image.resize(..., "bilinear")`: half-pixel
    centres, no antialiasing, torch's `F.interpolate(mode="bilinear", align_corners=False)`.
    Any sizes: square or not, larger or smaller, integer ratios or not. Growing the
    kernel inverts the resize exactly; shrinking it is the least-squares best. The
    matrix is computed once per pair of sizes, in float64; the result is differentiable
    in `weight`, so a training step can resample on the fly. The same size returns `weight`.
    """
    new = _pair(new_patch_size)
    old = (weight.shape[-2], weight.shape[-1])
    if new == old:
        return weight
    inverse = _pi_resize_matrix(old, new).to(device=weight.device, dtype=weight.dtype)
    kernel = rearrange(weight, "o i p q -> o i (p q)") @ inverse.T
    return rearrange(kernel, "o i (p q) -> o i p q", p=new[0], q=new[1])


@torch.compiler.disable
@functools.cache
def _pi_resize_matrix(old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """pinv(Rᵀ), (p'q', pq) float64: R (p'q', pq) is the bilinear resize of a patch as a matrix.

    Built as big_vision builds it, by resizing each basis patch. Made outside inference
    mode, so that a matrix first needed in validation serves training as well, and
    outside any compiled graph, so that the cache holds there too.
    """
    with torch.inference_mode(False), torch.no_grad():
        basis = torch.eye(old[0] * old[1], dtype=torch.float64)
        basis = rearrange(basis, "n (p q) -> n 1 p q", p=old[0], q=old[1])
        resized = F.interpolate(basis, size=new, mode="bilinear", align_corners=False)
        resize = rearrange(resized, "n 1 p q -> (p q) n")
        return torch.linalg.pinv(resize.T, rtol=PINV_RTOL)


def resample_flexi_pos_embed(
    table: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 0,
) -> torch.Tensor:
    """A position table (prefix + h*w, d) resized to (prefix + h'*w', d) as big_vision's flexi
    model resizes its `pos_embedding`.

    `jax.image.resize(..., "linear")`: bilinear with half-pixel centres that antialiases
    when it shrinks (a triangle filter widened by the scale), torch's
    `F.interpolate(mode="bilinear", align_corners=False, antialias=True)`. The first
    `num_prefix_tokens` rows (a class token's, which big_vision's table does not have)
    are kept as they are. Differentiable; half precision is resized in float32.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return table
    prefix, patches = table[:num_prefix_tokens], table[num_prefix_tokens:]
    patches = rearrange(patches, "(h w) d -> 1 d h w", h=old_grid[0], w=old_grid[1])
    dtype = table.dtype if table.dtype in (torch.float32, torch.float64) else torch.float32
    patches = F.interpolate(
        patches.to(dtype), size=new_grid, mode="bilinear", align_corners=False, antialias=True
    )
    patches = rearrange(patches, "1 d h w -> (h w) d").to(table.dtype)
    return torch.cat([prefix, patches], dim=0)


def draw_patch_size(sizes: Sequence[int], seed: int, step: int) -> int:
    """The patch size of training step `step`: uniform over `sizes`, as the paper trains.

    A pure function of (seed, step), like big_vision's per-step `np.random.default_rng`:
    every DDP rank draws the same size, a resumed run the sizes the first one drew, and
    neither the global torch, numpy nor Python RNG is read or advanced.
    """
    return int(np.random.default_rng((seed, step)).choice(list(sizes)))


def state_dict_at_patch_size(state: StateDict, model: nn.Module, prefix: str = "") -> StateDict:
    """A VisionTransformer's state dict (keys under `prefix`) made to load into `model`, a
    VisionTransformer built at another patch size.

    When the stored kernel's size differs from `model`'s, it is PI-resized to it and a
    learned table is resized from its (square) grid to `model`'s as the flexi model
    resizes it on the fly, class-token row kept: the converted model computes what the
    stored one computes with `forward(x, patch_size=...)`. Resampled in float64, stored
    in the state's dtype; a copy, `state` is not changed. Anything else, or a state
    already at `model`'s patch size, is returned as it is (`load_state_dict` then
    reports any mismatch).
    """
    kernel_key, table_key = f"{prefix}patch_embed.proj.weight", f"{prefix}pos_embed.pos_embedding"
    embed = getattr(model, "patch_embed", None)
    kernel = state.get(kernel_key)
    if embed is None or kernel is None or kernel.shape[:2] != embed.proj.weight.shape[:2]:
        return state
    target = tuple(embed.proj.weight.shape[-2:])
    if tuple(kernel.shape[-2:]) == target:
        return state
    state = copy.copy(state)  # keeps a state dict's `_metadata`
    state[kernel_key] = resample_patch_embed(kernel.double(), target).to(kernel.dtype)
    table, own = state.get(table_key), getattr(model.pos_embed, "pos_embedding", None)
    if table is not None and own is not None and table.shape != own.shape:
        state[table_key] = flexi_table_for(model, table, table.dtype)
    return state


def flexi_table_for(model: nn.Module, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored (1, prefix + side², d) learned table resized to `model`'s grid as the flexi
    model resizes it (`resample_flexi_pos_embed`, in float64), class-token rows kept, in `dtype`.

    For a checkpoint (`state_dict_at_patch_size`) and an official file
    (`checkpoints.resample`) of another patch size alike.
    """
    prefix = model.num_prefix_tokens
    side = math.isqrt(table.shape[1] - prefix)
    resized = resample_flexi_pos_embed(
        table[0].double(), (side, side), model.pos_embed.grid, prefix
    )
    return resized[None].to(dtype)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
