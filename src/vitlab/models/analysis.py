"""What the analysis notebooks compute from a model's internals, as tested functions.

The models expose their internals (`VisionTransformer.attention_maps`,
`VisionTransformer.position_embeddings`, `MlpMixer.token_mixing_weights`); these
functions turn them into the papers' figures: attention rollout (Abnar & Zuidema,
2020, as in the ViT paper's Figure 6) and the cosine similarity of position
embeddings (the ViT paper's Figure 7). Plain torch, no plotting.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, reduce


def attention_rollout(
    maps: Sequence[torch.Tensor], num_prefix_tokens: int, grid: tuple[int, int]
) -> torch.Tensor:
    """Each layer's attention (b, heads, n, n) -> how much each patch reaches the output, (b, h, w).

    Rollout: average the heads, add the identity for the residual path and
    renormalise the rows, then multiply the layers' matrices from the first to the
    last. The result is read from the class token's row (`num_prefix_tokens` 1) or,
    for a `gap` model (no prefix), averaged over all rows; each map sums to 1 over
    the patches it covers plus any prefix tokens.
    """
    first = maps[0]
    n = first.shape[-1]
    eye = torch.eye(n, dtype=first.dtype, device=first.device)
    rollout = eye.expand(first.shape[0], n, n)
    for layer in maps:
        joint = reduce(layer, "b heads i j -> b i j", "mean") + eye
        rollout = (joint / joint.sum(dim=-1, keepdim=True)) @ rollout
    reach = rollout[:, 0] if num_prefix_tokens else rollout.mean(dim=1)
    patches = reach[:, num_prefix_tokens:]
    return rearrange(patches, "b (h w) -> b h w", h=grid[0], w=grid[1])


def position_similarity(embeddings: torch.Tensor) -> torch.Tensor:
    """Position embeddings (h, w, d) -> cosine similarity of every patch with every other, (h, w, h, w).

    `[r, c]` is one small image: how similar patch (r, c)'s vector is to each
    patch's, the panel of the ViT paper's Figure 7 for that patch.
    """
    h, w = embeddings.shape[:2]
    vectors = F.normalize(rearrange(embeddings.float(), "h w d -> (h w) d"), dim=-1)
    return rearrange(vectors @ vectors.T, "(h w) (y x) -> h w y x", h=h, w=w, y=h, x=w)
