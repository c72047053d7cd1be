"""Token merging (ToMe; Bolya et al., 2023): fewer tokens in every block, without retraining.

In every block, between the attention and the MLP, `r` tokens are merged into
others by bipartite soft matching: the tokens are split alternately into sets A
and B, each token of A is paired with its most similar token of B (cosine
similarity of the attention keys, averaged over heads), and the `r` best pairs
are merged by a size-weighted average. A token's size is how many input tokens
it stands for; proportional attention adds log(size) to the attention logits, so
a merged token draws attention as the tokens it replaced would. The class token
is never merged and stays first. This follows the authors' code
(facebookresearch/ToMe: `tome/merge.py`, `tome/patch/timm.py`): the matching runs
without gradients, `r` is capped at half of the mergeable tokens, and the sizes
start as None (no proportional attention in the first block).

`Block.forward(..., merging=TokenMerging(...))` runs `merging_block`; the model's
`token_merging` attribute (ToMe's `model.r`) turns it on, and `check_token_merging`
says which models can merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from einops import rearrange, reduce, repeat

from vitlab.models import fast
from vitlab.models.patch_dropout import token_set_problem

if TYPE_CHECKING:
    from vitlab.models.layers import Attention, Block, Rotate


class TokenMerging(NamedTuple):
    """What ToMe carries from one block to the next.

    Attributes:
        r: tokens to merge away in each block (fewer where too few tokens are left).
        class_token: whether token 0 is a class token, which is never merged.
        size: (b, n, 1), how many input tokens each token stands for; None until
            the first merge (every size is 1).
    """

    r: int
    class_token: bool
    size: torch.Tensor | None = None


def check_token_merging(r: object, pos_embed: str) -> None:
    """Raise ValueError unless `r` is a non-negative integer that a model with `pos_embed` can merge.

    `rope2d` rotates queries and keys by each token's place on the grid, and
    `conditional` (CPVT's PEG) lays the tokens out on the grid after block 0: a
    merged token has no one place, so neither can merge.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(
            f"token_merging={r!r} must be a non-negative integer: the tokens merged in "
            "every block (0 is off)"
        )
    if problem := token_set_problem("token_merging", r, pos_embed):
        raise ValueError(problem)


def token_counts(tokens: int, r: int, depth: int, class_token: bool) -> list[int]:
    """The tokens entering each of `depth` blocks, then leaving the last, at ToMe's `r`.

    Each block merges `r` tokens, or half of its mergeable tokens where fewer are
    left (the cap of `bipartite_soft_matching`), so the list shows where `r` is capped.
    """
    counts = [tokens]
    for _ in range(depth):
        counts.append(counts[-1] - max(0, min(r, (counts[-1] - class_token) // 2)))
    return counts


@dataclass(frozen=True)
class Matching:
    """Which tokens of set A (the even tokens) merge into which tokens of set B (the odd ones).

    Attributes:
        unmerged: (b, |A| - r) indices into A of the tokens kept.
        merged: (b, r) indices into A of the tokens merged away.
        destination: (b, r) the index into B that each merged token goes to.
    """

    unmerged: torch.Tensor
    merged: torch.Tensor
    destination: torch.Tensor

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(b, t, c) -> (b, t - r, c): the kept tokens of A, then B with the merged ones summed in."""
        a, b = x[:, ::2], x[:, 1::2]
        c = x.shape[-1]
        kept = a.gather(1, repeat(self.unmerged, "b n -> b n c", c=c))
        moved = a.gather(1, repeat(self.merged, "b r -> b r c", c=c))
        b = b.scatter_reduce(1, repeat(self.destination, "b r -> b r c", c=c), moved, "sum")
        return torch.cat([kept, b], dim=1)


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool) -> Matching | None:
    """ToMe's matching of the tokens (b, t, c) by their `metric`, or None where none can merge.

    `r` is capped at half of the tokens that may merge. Each token of A takes its
    most similar token of B (cosine); the `r` most similar pairs merge. The class
    token (the first of A) has no match; the kept tokens stay in their order, so
    it stays first.
    """
    r = min(r, (metric.shape[1] - class_token) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = torch.einsum("b i c, b j c -> b i j", a, b)
        if class_token:
            scores[:, 0, :] = -torch.inf
        best, destination = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        unmerged, merged = order[:, r:], order[:, :r]
        if class_token:
            unmerged = unmerged.sort(dim=-1).values
        return Matching(unmerged, merged, destination.gather(1, merged))


def merge_weighted_average(
    matching: Matching, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens x (b, t, c) of sizes (b, t, 1) (None: all 1) by their size-weighted average.

    Returns the merged tokens, in x's dtype, and their sizes, the sums of the merged
    sizes, kept in float32 so that they stay whole numbers in a bfloat16 model.
    """
    if size is None:
        size = torch.ones_like(x[..., :1], dtype=torch.float32)
    x = matching.merge(x * size.to(x.dtype))
    size = matching.merge(size)
    return x / size.to(x.dtype), size


def proportional_attention(size: torch.Tensor | None) -> torch.Tensor | None:
    """log(size) of the keys, added to every query's attention logits: (b, n, 1) -> (b, 1, 1, n)."""
    return None if size is None else rearrange(size.log(), "b n 1 -> b 1 1 n")


def attention_with_keys(
    attn: Attention, x: torch.Tensor, rotate: Rotate | None, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attn(x, rotate)` with `bias` added to its logits, and its keys averaged over heads, (b, n, head_dim).

    ToMe's attention: the keys are what the matching compares.
    """
    q, k, v = attn.queries_keys_values(x, rotate)
    attended = attn.out(rearrange(attn.attend(q, k, v, bias), "b h n d -> b n (h d)"))
    return attended, reduce(k, "b h n d -> b n d", "mean")


def merging_block(
    block: Block,
    x: torch.Tensor,
    rotate: Rotate | None,
    merging: TokenMerging,
    class_token_only: bool = False,
) -> tuple[torch.Tensor, TokenMerging]:
    """ToMe's block: attention with proportional attention, merge `merging.r` tokens, MLP.

    Tokens (b, n, d) -> (b, n - r, d) and the merging state with the new sizes.
    `class_token_only`: the class token alone, (b, 1, d), by `fast.class_token_block`;
    the merge is skipped there, since it never changes the class token.
    """
    bias = proportional_attention(merging.size)
    if class_token_only:
        return fast.class_token_block(block, x, rotate, bias), merging
    attended, keys = attention_with_keys(block.attn, block.norm1(x), rotate, bias)
    x = x + block.drop_path(block.drop(attended))
    matching = bipartite_soft_matching(keys, merging.r, merging.class_token)
    if matching is not None:
        x, size = merge_weighted_average(matching, x, merging.size)
        merging = merging._replace(size=size)
    return x + block.drop_path(block.mlp(block.norm2(x))), merging


def expand_by_size(x: torch.Tensor, size: torch.Tensor | None, tokens: int) -> torch.Tensor:
    """Tokens (b, n, d) of sizes (b, n, 1) -> (b, tokens, d), each repeated `size` times.

    `tokens` is the count before merging (every image's sizes add up to it). The
    encoder's output then has the plain model's shape, and its mean over tokens is
    ToMe's size-weighted average pooling (`tome/patch/mae.py`).
    """
    if size is None:
        return x
    b = x.shape[0]
    repeated = rearrange(x, "b n d -> (b n) d").repeat_interleave(
        rearrange(size, "b n 1 -> (b n)").round().long(), dim=0, output_size=b * tokens
    )
    return rearrange(repeated, "(b t) d -> b t d", b=b)
