"""Position encodings for ViT and the hybrids.

`LearnedPositionEmbedding` is the original's `AddPositionEmbs`: one learned vector
per token (class token included), added once before the first block.
`resize_learned_posemb` is the original's fine-tuning resize: the patch part of the
table is treated as a (gh, gw) image and resampled bilinearly with
align_corners=True, which is what `scipy.ndimage.zoom(order=1)` computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class LearnedPositionEmbedding(nn.Module):
    """A learned 1-D table of `num_tokens` x `hidden_size`, initialised N(0, 0.02).

    Attributes:
        num_prefix_tokens: tokens before the patches (1 for the class token, else 0).
        grid: (h, w) of the patch grid the table was built for.
        hidden_size: token width.
    """

    def __init__(self, num_prefix_tokens: int, grid: tuple[int, int], hidden_size: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = tuple(grid)
        self.pos_embedding = nn.Parameter(
            torch.empty(1, num_prefix_tokens + grid[0] * grid[1], hidden_size)
        )
        nn.init.normal_(self.pos_embedding, std=0.02)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        posemb = self.pos_embedding
        if tuple(grid) != self.grid:
            posemb = resize_learned_posemb(posemb, self.num_prefix_tokens, self.grid, grid)
        return x + posemb.to(x.dtype)


def resize_learned_posemb(
    posemb: torch.Tensor,
    num_prefix_tokens: int,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
) -> torch.Tensor:
    """Resample a (1, prefix + gh*gw, D) table to a new patch grid, keeping the prefix.

    Bilinear with align_corners=True reproduces the original's
    `scipy.ndimage.zoom(grid, zoom, order=1)` to float precision.
    """
    prefix, patches = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    patches = rearrange(patches, "1 (h w) d -> 1 d h w", h=old_grid[0], w=old_grid[1])
    patches = F.interpolate(
        patches.float(), size=tuple(new_grid), mode="bilinear", align_corners=True
    )
    patches = rearrange(patches, "1 d h w -> 1 (h w) d").to(posemb.dtype)
    return torch.cat([prefix, patches], dim=1)
