"""PatchDropout (Liu et al., 2023): train on a random subset of the patch tokens.

Each training image keeps `int(n * (1 - rate))` of its n patch tokens, drawn
uniformly and kept in their original order, as the authors' code does; the class
token is always kept. It runs after the position embedding is added, so a kept
token still carries its position, and the encoder simply sees fewer tokens: the
cost of every block falls with the share dropped. Evaluation sees every token.
The draws come from the global torch RNG, which Lightning seeds and a checkpoint
saves, so a resumed run draws the same tokens.
"""

from __future__ import annotations

import torch
from einops import repeat
from torch import nn

# Position encodings that need every token of the grid after the embedding: CPVT's PEG
# lays the tokens out on the grid after block 0, rope2d rotates by each token's place.
NEEDS_EVERY_TOKEN = ("conditional", "rope2d")


def token_set_problem(key: str, value: float, pos_embed: str, prefix: str = "") -> str | None:
    """Why a model with `pos_embed` cannot run `key=value` (PatchDropout's rate, ToMe's r), or None.

    Both change which tokens the blocks see; the encodings of `NEEDS_EVERY_TOKEN` cannot
    follow. One message for the model's constructor, `token_merging`'s setter and the run
    check (`prefix="model."`).
    """
    if not value or pos_embed not in NEEDS_EVERY_TOKEN:
        return None
    return (
        f"{prefix}{key}={value} changes which tokens the blocks see, but "
        f"{prefix}pos_embed={pos_embed!r} needs every token of the patch grid at its place "
        f"(refused: {', '.join(NEEDS_EVERY_TOKEN)}); use pos_embed learned, sincos2d or none "
        f"with it, or {prefix}{key}=0"
    )


class PatchDropout(nn.Module):
    """Keep a random `1 - rate` share of the patch tokens of each image while training.

    Attributes:
        rate: the share of patch tokens dropped, in [0, 1); 0.0 is the identity.
        num_prefix_tokens: tokens before the patches (the class token), always kept.
    """

    def __init__(self, rate: float = 0.0, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"patch_dropout={rate} must be in [0, 1)")
        self.rate = rate
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (b, prefix + n, d) -> (b, prefix + keep, d) in training, unchanged in eval."""
        if not self.training or self.rate == 0.0:
            return x
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        b, n, d = patches.shape
        keep = max(1, int(n * (1.0 - self.rate)))
        kept = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :keep].sort(dim=1).values
        patches = patches.gather(1, repeat(kept, "b k -> b k d", d=d))
        return torch.cat([prefix, patches], dim=1)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"
