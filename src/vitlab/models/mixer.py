"""MlpMixer, faithful to `vit_jax/models_mixer.py`.

The same blocks in the same order as the original: per-patch linear stem ->
MixerBlocks (token mixing across patches, then channel mixing per patch) ->
`pre_head_layer_norm` -> mean over tokens -> zero-initialised head. No position
encoding: token mixing sees the patches in a fixed order. Input is NCHW float in
[-1, 1].

`MixerBlock.mix_tokens` is the paper's token mixing (transpose, MLP, transpose
back); `forward` takes the speed path `fast.token_mixing`, which computes the same
without the transposed copies.

Two of ViT's scale knobs apply: `grad_checkpointing` and `channels_last` (for the
patch-embedding conv). There is no attention, so no `attention_backend`.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from vitlab.bounds import Count, NonNegativeInt, Size
from vitlab.errors import ConfigError
from vitlab.models import fast
from vitlab.models.layers import (
    LAYER_NORM_EPS,
    GeluApproximate,
    Mlp,
    PatchEmbed,
    checkpointed,
    classification_head,
    lecun_normal_,
    patch_grid,
)


def _mixer_mlp(dim: int, mlp_dim: int, gelu_approximate: GeluApproximate) -> Mlp:
    """Mixer's `MlpBlock`: the ViT `Mlp` without dropout, with Flax's default Dense init."""
    mlp = Mlp(dim, mlp_dim, gelu_approximate=gelu_approximate)
    for fc in (mlp.fc1, mlp.fc2):
        lecun_normal_(fc.weight)
        nn.init.zeros_(fc.bias)
    return mlp


class MixerBlock(nn.Module):
    """x + TokenMLP(LN(x)ᵀ)ᵀ, then x + ChannelMLP(LN(x)) (`MixerBlock`).

    Attributes:
        num_tokens: patches per image; the token-mixing MLP's input width.
        hidden_dim: channels per patch.
        tokens_mlp_dim: inner width of the token-mixing MLP.
        channels_mlp_dim: inner width of the channel-mixing MLP.
        gelu_approximate: "tanh" as the original; "none" for exact GELU.
    """

    def __init__(
        self,
        num_tokens: int,
        hidden_dim: int,
        tokens_mlp_dim: int,
        channels_mlp_dim: int,
        gelu_approximate: GeluApproximate = "tanh",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)
        self.token_mixing = _mixer_mlp(num_tokens, tokens_mlp_dim, gelu_approximate)
        self.norm2 = nn.LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)
        self.channel_mixing = _mixer_mlp(hidden_dim, channels_mlp_dim, gelu_approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (b, n, c) -> the same shape: mix across patches, then within each patch."""
        x = fast.token_mixing(self.token_mixing, self.norm1(x), x)  # = x + self.mix_tokens(LN(x))
        return x + self.channel_mixing(self.norm2(x))

    def mix_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """The paper's token mixing, TokenMLP(yᵀ)ᵀ, for y (b, n, c): one MLP across the patches.

        What `fast.token_mixing` computes (plus the residual), written as the paper
        does; `tests/test_fast_paths.py` holds the two equal.
        """
        y = rearrange(y, "b n c -> b c n")
        y = self.token_mixing(y)
        return rearrange(y, "b c n -> b n c")


class MlpMixer(nn.Module):
    """MLP-Mixer (Tolstikhin et al., 2021).

    The token-mixing MLPs are as wide as the number of patches, so a Mixer is tied
    to one `image_size` (unlike ViT, whose position table can be resized).

    Attributes:
        image_size: side of the square input in pixels.
        patch_size: side of a patch in pixels; must divide `image_size`.
        num_classes: size of the head; 0 for no head (features only).
        hidden_dim, num_blocks, tokens_mlp_dim, channels_mlp_dim: the paper's Table 1.
        num_channels: input image channels.
        gelu_approximate: "tanh" as the original; "none" for exact GELU.
        pos_embed: must be None. Accepted so that `model.pos_embed=...` on a Mixer
            config fails with a message saying why, rather than as an unknown key.
        grad_checkpointing: recompute each MixerBlock's activations in backward
            instead of keeping them (while training only).
        attention_backend: must be None, for the reason `pos_embed` must: Mixer has
            no attention, so `model.attention_backend=...` fails saying so.
        channels_last: keep the patch-embedding conv's weight and input in
            channels-last (NHWC) memory. Same outputs, same state dict.
        patch_norm: a LayerNorm over each token after the per-patch projection (see
            `PatchEmbed`); not in the original, off in every paper config.
    """

    def __init__(
        self,
        image_size: Size,
        patch_size: Size,
        num_classes: NonNegativeInt,
        hidden_dim: Size,
        num_blocks: Count,
        tokens_mlp_dim: Size,
        channels_mlp_dim: Size,
        num_channels: Count = 3,
        gelu_approximate: GeluApproximate = "tanh",
        pos_embed: str | None = None,  # refused unless None, by the model, with the reason
        grad_checkpointing: bool = False,
        attention_backend: str | None = None,  # likewise
        channels_last: bool = False,
        patch_norm: bool = False,
    ) -> None:
        super().__init__()
        refuse_vit_only_options(pos_embed, attention_backend)
        self.grid = patch_grid(image_size, patch_size)
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.grad_checkpointing = grad_checkpointing
        self.channels_last = channels_last
        num_tokens = self.grid[0] * self.grid[1]

        self.stem = PatchEmbed(patch_size, num_channels, hidden_dim, norm=patch_norm)
        self.blocks = nn.ModuleList(
            MixerBlock(num_tokens, hidden_dim, tokens_mlp_dim, channels_mlp_dim, gelu_approximate)
            for _ in range(num_blocks)
        )
        self.pre_head_layer_norm = nn.LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)
        self.head = classification_head(hidden_dim, num_classes)
        if channels_last:
            self.stem.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (b, c, H, W) in [-1, 1] -> logits (b, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (b, c, H, W) -> mixed tokens (b, h*w, hidden_dim), after `pre_head_layer_norm`."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x, _ = self.stem(x)
        for block in self.blocks:
            x = checkpointed(block, x, enabled=self.grad_checkpointing)
        return self.pre_head_layer_norm(x)

    def token_mixing_weights(self, block: int = 0) -> torch.Tensor:
        """The first token-mixing layer of block `block` as images: (tokens_mlp_dim, h, w).

        Hidden unit i of the token-mixing MLP reads the patches with the weights
        [i], laid out on the patch grid; the Mixer paper's Figure 4 shows these for
        the first blocks. A detached copy (safe to plot while training).
        """
        weight = self.blocks[block].token_mixing.fc1.weight.detach()
        return rearrange(weight, "u (h w) -> u h w", h=self.grid[0], w=self.grid[1]).clone()

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed tokens -> logits: mean over tokens, then the head."""
        return self.head(x.mean(dim=1))


def refuse_vit_only_options(
    pos_embed: str | None, attention_backend: str | None, model: str = "MlpMixer"
) -> None:
    """An all-MLP `model` (Mixer, gMLP) has neither a position encoding nor attention: say so when one is set."""
    if attention_backend is not None:
        raise ConfigError(
            f"{model} has no attention layers, so there is no attention kernel to pick; got "
            f"model.attention_backend={attention_backend!r}. Remove model.attention_backend "
            "(it is only for ViT and hybrids)"
        )
    if pos_embed is not None:
        raise ValueError(
            f"{model} has no position encoding: its token-mixing layers give each patch "
            f"index its own weights, so they already know where every patch is; got "
            f"pos_embed={pos_embed!r}. Remove model.pos_embed (it is only for ViT and hybrids)"
        )
    if pos_embed is not None:
        raise ValueError(
            f"MlpMixer has no position encoding: its token-mixing MLPs give each patch "
            f"index its own weights, so they already know where every patch is; got "
            f"pos_embed={pos_embed!r}. Remove model.pos_embed (it is only for ViT and hybrids)"
        )
