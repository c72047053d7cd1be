"""gMLP (Liu et al., 2021, "Pay Attention to MLPs"), in the paper's pseudo-code order.

Per-patch linear stem -> GMlpBlocks -> final LayerNorm -> mean over tokens ->
zero-initialised head. Each block is the paper's Figure 1: norm, channel
projection up to `ffn_dim`, GELU, the spatial gating unit, channel projection back
down to `hidden_dim`, residual. The spatial gating unit splits the channels into
halves u and v, normalises v, mixes v across the tokens with one (n -> n)
projection whose weights start near zero and bias at one, and returns u * v: at
initialisation every block is close to a plain channel MLP. No position encoding:
like Mixer, the spatial projection gives each patch index its own weights, and ties
the model to one `image_size`. Input is NCHW float in [-1, 1].

There is no official JAX release of gMLP, so timm's `SpatialGatingBlock` /
`GatedMlp` is the reference: LayerNorm eps 1e-6 for the block and final norms but
PyTorch's 1e-5 for the gating unit's norm (timm builds it with a plain
`nn.LayerNorm`), exact (erf) GELU, u and v as `x.chunk(2, dim=-1)`, and the same
parameter shapes (every projection an `nn.Linear`), so timm's weights map 1:1.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from vitlab.bounds import Count, NonNegativeInt, Rate, Size
from vitlab.models.layers import (
    LAYER_NORM_EPS,
    DropPath,
    GeluApproximate,
    PatchEmbed,
    checkpointed,
    classification_head,
    patch_grid,
)
from vitlab.models.mixer import refuse_vit_only_options

# timm's `SpatialGatingUnit` norm is `nn.LayerNorm` with PyTorch's default eps.
GATE_NORM_EPS = 1e-5


def _channel_proj(in_features: int, out_features: int) -> nn.Linear:
    """A channel projection with timm's gMLP init: Xavier-uniform weights, bias ~ N(0, 1e-6)."""
    proj = nn.Linear(in_features, out_features)
    nn.init.xavier_uniform_(proj.weight)
    nn.init.normal_(proj.bias, std=1e-6)
    return proj


class SpatialGatingUnit(nn.Module):
    """u * SpatialProj(LN(v)), with u, v the two halves of the channels (the paper's Eq. 2-3).

    The spatial projection's weights start at N(0, 1e-6) and its bias at 1 (the
    paper's "near-zero weights and unit biases", as timm), so at first v ≈ 1 and
    the unit passes u through: training starts from a channel MLP and learns how
    much to mix across tokens.

    Attributes:
        num_tokens: patches per image (n); the spatial projection is n -> n.
        ffn_dim: channels coming in (d_ffn); the output has half of them.
    """

    def __init__(self, num_tokens: int, ffn_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(ffn_dim // 2, eps=GATE_NORM_EPS)
        self.spatial_proj = nn.Linear(num_tokens, num_tokens)
        nn.init.normal_(self.spatial_proj.weight, std=1e-6)
        nn.init.ones_(self.spatial_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (b, n, ffn_dim) -> gated tokens (b, n, ffn_dim / 2)."""
        u, v = rearrange(x, "b n (two e) -> two b n e", two=2)  # = x.chunk(2, dim=-1)
        v = self.norm(v)
        v = rearrange(v, "b n e -> b e n")
        v = self.spatial_proj(v)
        v = rearrange(v, "b e n -> b n e")
        return u * v


class GMlpBlock(nn.Module):
    """x + ChannelProj2(SGU(GELU(ChannelProj1(LN(x))))) (the paper's `gmlp_block`).

    Attributes:
        num_tokens: patches per image; the gating unit's spatial width.
        hidden_dim: channels per token (d_model).
        ffn_dim: inner width (d_ffn); must be even, the gating unit splits it in two.
        gelu_approximate: "none" (exact GELU, as timm) or "tanh".
        drop_path_rate: stochastic depth: the chance that a sample skips the block's
            branch while training (see `layers.DropPath`).
    """

    def __init__(
        self,
        num_tokens: int,
        hidden_dim: int,
        ffn_dim: int,
        gelu_approximate: GeluApproximate = "none",
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if ffn_dim % 2:
            raise ValueError(
                f"ffn_dim={ffn_dim} is odd; the spatial gating unit splits it into two equal "
                f"halves, so it must be even (e.g. {ffn_dim + 1})"
            )
        self.norm = nn.LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)
        self.channel_proj1 = _channel_proj(hidden_dim, ffn_dim)
        self.act = nn.GELU(approximate=gelu_approximate)
        self.sgu = SpatialGatingUnit(num_tokens, ffn_dim)
        self.channel_proj2 = _channel_proj(ffn_dim // 2, hidden_dim)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (b, n, hidden_dim) -> the same shape."""
        shortcut = x
        x = self.norm(x)
        x = self.channel_proj1(x)
        x = self.act(x)
        x = self.sgu(x)
        x = self.channel_proj2(x)
        return shortcut + self.drop_path(x)


class GMlp(nn.Module):
    """gMLP (Liu et al., 2021): MLPs with spatial gating, no attention.

    The spatial projections are as wide as the number of patches, so, like a Mixer,
    a gMLP is tied to one `image_size`.

    Attributes:
        image_size: side of the square input in pixels.
        patch_size: side of a patch in pixels; must divide `image_size`.
        num_classes: size of the head; 0 for no head (features only).
        hidden_dim: token width (the paper's d_model).
        num_blocks: number of gMLP blocks (L).
        ffn_dim: inner width of each block (d_ffn; even).
        num_channels: input image channels.
        gelu_approximate: "none" (exact GELU, as timm) or "tanh".
        pos_embed: must be None; accepted so that `model.pos_embed=...` fails with
            the reason (see `mixer.MlpMixer`).
        grad_checkpointing: recompute each GMlpBlock's activations in backward
            instead of keeping them (while training only).
        attention_backend: must be None, as `pos_embed`: gMLP has no attention.
        channels_last: keep the patch-embedding conv's weight and input in
            channels-last (NHWC) memory. Same outputs, same state dict.
        drop_path_rate: stochastic depth of the last block; block i of L skips its
            branch with rate drop_path_rate * i / (L - 1), as `VisionTransformer`.
            (timm uses one rate for every block.) No parameters: the state dict is
            the same at any rate.
        patch_norm: a LayerNorm (eps 1e-6) on the tokens right after the patch
            projection (`PatchEmbed`'s `norm`, timm's `stem_norm`); off in timm's
            gMLP configs.
    """

    def __init__(
        self,
        image_size: Size,
        patch_size: Size,
        num_classes: NonNegativeInt,
        hidden_dim: Size,
        num_blocks: Count,
        ffn_dim: Size,
        num_channels: Count = 3,
        gelu_approximate: GeluApproximate = "none",
        pos_embed: str | None = None,  # refused unless None, by the model, with the reason
        grad_checkpointing: bool = False,
        attention_backend: str | None = None,  # likewise
        channels_last: bool = False,
        drop_path_rate: Rate = 0.0,
        patch_norm: bool = False,
    ) -> None:
        super().__init__()
        refuse_vit_only_options(pos_embed, attention_backend, model="GMlp")
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
            GMlpBlock(
                num_tokens,
                hidden_dim,
                ffn_dim,
                gelu_approximate,
                drop_path_rate * index / max(1, num_blocks - 1),
            )
            for index in range(num_blocks)
        )
        self.norm = nn.LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)
        self.head = classification_head(hidden_dim, num_classes)
        if channels_last:
            self.stem.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (b, c, H, W) in [-1, 1] -> logits (b, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (b, c, H, W) -> gated tokens (b, h*w, hidden_dim), after the final norm."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x, _ = self.stem(x)
        for block in self.blocks:
            x = checkpointed(block, x, enabled=self.grad_checkpointing)
        return self.norm(x)

    def spatial_gating_weights(self, block: int = 0) -> torch.Tensor:
        """The spatial projection of block `block`'s gating unit as images: (num_tokens, h, w).

        Output token i gates itself with the patches weighted by [i], laid out on the
        patch grid, as the gMLP paper visualises them (the Mixer counterpart is
        `MlpMixer.token_mixing_weights`). A detached copy (safe to plot while training).
        """
        weight = self.blocks[block].sgu.spatial_proj.weight.detach()
        return rearrange(weight, "t (h w) -> t h w", h=self.grid[0], w=self.grid[1]).clone()

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Gated tokens -> logits: mean over tokens, then the head."""
        return self.head(x.mean(dim=1))
