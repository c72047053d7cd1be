"""Position encodings for ViT and the hybrids, all behind one small interface.

A position encoding can act at three places in the encoder, and `PositionEncoding`
has one hook for each, a no-op unless a subclass overrides it:

- `forward(x, grid, flexi=False)`: on the tokens before the first block (the original's
  `AddPositionEmbs`; `learned`, `sincos2d`);
- `after_block(index, x, grid)`: on the tokens between blocks (`conditional`, CPVT's PEG);
- `rotation(grid, device)`: a map applied to the queries and keys of every attention
  layer (`rope2d`).

Every hook receives the actual (h, w) patch grid, so each encoding works at any
input resolution: the learned table is resized bilinearly, the others are
computed for the grid at hand. A grid that another patch size makes (FlexiViT,
`flexi=True`) is one more grid for the computed encodings; the learned table is
then resized as big_vision's flexi model resizes it (`flexi.py`), and for another
resolution as the original fine-tunes. Tokens before the patches (the class token) get no
position: zeros added, or an identity rotation. `build_position_encoding` turns the
`pos_embed` config value into one of these modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitlab.models.flexi import resample_flexi_pos_embed

PosEmbed = Literal["learned", "sincos2d", "none", "conditional", "rope2d"]
SINCOS_TEMPERATURE = 10_000.0
# RoPE-Axial's base (Heo et al., 2024): an axis has tens of positions, not thousands of
# tokens, and with 10000 most channel pairs would barely turn across the whole grid.
ROPE_THETA = 100.0


class PositionEncoding(nn.Module):
    """The interface: three hooks into the encoder, each leaving the tokens unchanged here.

    Attributes:
        kind: the `pos_embed` config value that builds this encoding.
        num_prefix_tokens: tokens before the patches (1 for the class token, else 0);
            they get no position.
    """

    kind: ClassVar[str]

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor, grid: tuple[int, int], flexi: bool = False) -> torch.Tensor:
        """Tokens (b, prefix + h*w, d) before the first block -> the same shape.

        `flexi`: the grid is that of another patch size than the model's (FlexiViT),
        which only the learned table resizes differently.
        """
        return x

    def after_block(self, index: int, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens (b, prefix + h*w, d) after encoder block `index` -> the same shape."""
        return x

    def rotation(self, grid: tuple[int, int], device: torch.device) -> Rotation | None:
        """The map applied to queries and keys in every attention layer, or None for none."""
        return None

    def table(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """The (prefix + h*w, d) vectors `forward` adds to the tokens of a grid, or None
        when the encoding adds none (it acts between blocks or inside attention instead)."""
        return None

    def no_weight_decay(self) -> set[str]:
        """Names of own parameters the optimizer should not decay."""
        return set()


class NoPositionEncoding(PositionEncoding):
    """No position information at all: the encoder is equivariant to permuting the patches.

    Attributes:
        num_prefix_tokens: see `PositionEncoding`.
    """

    kind = "none"


class LearnedPositionEmbedding(PositionEncoding):
    """A learned 1-D table of `num_tokens` x `hidden_size`, initialised N(0, 0.02).

    The original's `AddPositionEmbs`: one vector per token, class token included,
    added before the first block. At another grid the patch part is resized
    bilinearly: as the original does for fine-tuning (`resize_learned_posemb`), or,
    at another patch size, as FlexiViT does (`flexi.resample_flexi_pos_embed`).

    Attributes:
        num_prefix_tokens: tokens before the patches (1 for the class token, else 0).
        grid: (h, w) of the patch grid the table was built for.
        hidden_size: token width.
    """

    kind = "learned"

    def __init__(self, num_prefix_tokens: int, grid: tuple[int, int], hidden_size: int) -> None:
        super().__init__(num_prefix_tokens)
        self.grid = tuple(grid)
        self.pos_embedding = nn.Parameter(
            torch.empty(1, num_prefix_tokens + grid[0] * grid[1], hidden_size)
        )
        nn.init.normal_(self.pos_embedding, std=0.02)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], flexi: bool = False) -> torch.Tensor:
        return x + self.table(grid, x.device, flexi).to(x.dtype)

    def table(
        self, grid: tuple[int, int], device: torch.device, flexi: bool = False
    ) -> torch.Tensor:
        """The (prefix + h*w, d) learned table, resized when `grid` is not the one it was built
        for: by FlexiViT's resize when `flexi` (another patch size), else by the original's."""
        if tuple(grid) == self.grid:
            return self.pos_embedding[0].to(device)
        if flexi:
            table = resample_flexi_pos_embed(
                self.pos_embedding[0], self.grid, grid, self.num_prefix_tokens
            )
            return table.to(device)
        posemb = resize_learned_posemb(self.pos_embedding, self.num_prefix_tokens, self.grid, grid)
        return posemb[0].to(device)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embedding"}


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


def _grid_coordinates(
    grid: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) of every patch in row-major (h w) token order, each (h*w,) float32."""
    y, x = torch.meshgrid(
        torch.arange(grid[0], device=device, dtype=torch.float32),
        torch.arange(grid[1], device=device, dtype=torch.float32),
        indexing="ij",
    )
    return rearrange(y, "h w -> (h w)"), rearrange(x, "h w -> (h w)")


class SinCos2dPositionEmbedding(PositionEncoding):
    """Fixed 2-D sine-cosine embedding, big_vision's `posemb_sincos_2d`, added before the first block.

    A quarter of the channels each for sin(x), cos(x), sin(y), cos(y), with
    frequencies 1 / 10000^(i / (D/4 - 1)) for i < D/4 (so the first is 1 and the
    last 1/10000; timm's variant divides by D/4 and orders the axes differently).
    Computed for the actual grid on every call, so it fits any resolution and is
    not in the state dict; the class token gets zeros.

    Attributes:
        num_prefix_tokens: see `PositionEncoding`.
        hidden_size: token width; a multiple of 4, at least 8.
    """

    kind = "sincos2d"

    def __init__(self, num_prefix_tokens: int, hidden_size: int) -> None:
        super().__init__(num_prefix_tokens)
        if hidden_size % 4 or hidden_size < 8:
            raise ValueError(
                f"pos_embed='sincos2d' splits hidden_size into sin/cos of x and y with at least "
                f"two frequencies each, so it needs a multiple of 4 that is >= 8; "
                f"got hidden_size={hidden_size}"
            )
        self.hidden_size = hidden_size

    def table(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """The (prefix + h*w, hidden_size) float32 embedding of a grid, zero rows for the prefix."""
        y, x = _grid_coordinates(grid, device)
        quarter = self.hidden_size // 4
        omega = torch.arange(quarter, device=device, dtype=torch.float32) / (quarter - 1)
        omega = 1.0 / SINCOS_TEMPERATURE**omega
        x, y = torch.outer(x, omega), torch.outer(y, omega)
        table = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
        return F.pad(table, (0, 0, self.num_prefix_tokens, 0))

    def forward(self, x: torch.Tensor, grid: tuple[int, int], flexi: bool = False) -> torch.Tensor:
        # Computed for the grid at hand at any patch size (big_vision's flexi model resizes
        # the table of its built grid instead; docs/dynamic_patches.md).
        return x + self.table(grid, x.device).to(x.dtype)


class ConditionalPositionEncoding(PositionEncoding):
    """CPVT's conditional position encoding (Chu et al., 2023): its PEG after the first block.

    The patch tokens are laid out on their (h, w) grid and a depthwise 3x3 conv
    (zero padding, with bias) is added to them, x + conv(x); the class token passes
    through. Position comes from the zero padding at the borders, so it works at any
    grid. Once, after block 0, is where CPVT found it best. PyTorch's default conv
    init, as CPVT's code.

    Attributes:
        num_prefix_tokens: see `PositionEncoding`.
        proj: the depthwise conv, `hidden_size` groups.
    """

    kind = "conditional"

    def __init__(self, num_prefix_tokens: int, hidden_size: int) -> None:
        super().__init__(num_prefix_tokens)
        self.proj = nn.Conv2d(hidden_size, hidden_size, 3, padding=1, groups=hidden_size)

    def after_block(self, index: int, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if index != 0:
            return x
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        feature_map = rearrange(patches, "b (h w) d -> b d h w", h=grid[0], w=grid[1])
        patches = patches + rearrange(self.proj(feature_map), "b d h w -> b (h w) d")
        return torch.cat([prefix, patches], dim=1)


@dataclass(frozen=True)
class Rotation:
    """Rotate each adjacent channel pair (2i, 2i+1) of a token by that token's angle i.

    Called on queries or keys (b, heads, n, head_dim); `cos` and `sin` are
    (n, head_dim / 2) float32 and cast to the input's dtype. The same rotation on q
    and k makes q·k depend on the two tokens' positions only through their offset.

    Attributes:
        cos, sin: of the angles, one row per token.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        a, b = rearrange(t, "b h n (d two) -> two b h n d", two=2)
        cos, sin = self.cos.to(t.dtype), self.sin.to(t.dtype)
        return rearrange([a * cos - b * sin, a * sin + b * cos], "two b h n d -> b h n (d two)")


class AxialRotaryEmbedding(PositionEncoding):
    """2-D axial rotary embedding, RoPE-Axial of Heo et al. (2024), on q and k in every layer.

    Of each head's head_dim / 2 channel pairs, the first half turns with the
    patch's column x and the second half with its row y, at frequencies
    1 / theta^(4i / head_dim) for i < head_dim / 4. theta = 100 as Heo et al. use
    for RoPE-Axial: an axis of a ViT grid has tens of positions, and with the
    language-model 10000 most pairs would barely turn across it. The class token is
    not rotated. Nothing is learned or stored; the angles are recomputed for the
    actual grid on each forward (a few tiny ops), and not cached, since tensors
    made under `torch.inference_mode` (Lightning's validation) cannot be reused in
    training.

    Attributes:
        num_prefix_tokens: see `PositionEncoding`.
        head_dim: width of one attention head; a multiple of 4.
    """

    kind = "rope2d"

    def __init__(self, num_prefix_tokens: int, hidden_size: int, num_heads: int) -> None:
        super().__init__(num_prefix_tokens)
        if hidden_size % (4 * num_heads):
            raise ValueError(
                f"pos_embed='rope2d' rotates channel pairs of each head with x and y, so it needs "
                f"head_dim = hidden_size / num_heads divisible by 4; got hidden_size={hidden_size}, "
                f"num_heads={num_heads} (head_dim {hidden_size / num_heads:g})"
            )
        self.head_dim = hidden_size // num_heads

    def rotation(self, grid: tuple[int, int], device: torch.device) -> Rotation:
        y, x = _grid_coordinates(grid, device)
        exponent = torch.arange(0, self.head_dim, 4, device=device, dtype=torch.float32)
        freqs = 1.0 / ROPE_THETA ** (exponent / self.head_dim)
        angles = torch.cat([torch.outer(x, freqs), torch.outer(y, freqs)], dim=1)
        angles = F.pad(angles, (0, 0, self.num_prefix_tokens, 0))  # angle 0: identity
        return Rotation(angles.cos(), angles.sin())


def build_position_encoding(
    kind: str,
    *,
    num_prefix_tokens: int,
    grid: tuple[int, int],
    hidden_size: int,
    num_heads: int,
) -> PositionEncoding:
    """The position encoding a `pos_embed` config value names, for a model of these sizes.

    Raises ValueError naming `pos_embed`, the value and the valid choices for an
    unknown value, and the encoding's own ValueError for sizes it cannot take.
    """
    match kind:
        case "learned":
            return LearnedPositionEmbedding(num_prefix_tokens, grid, hidden_size)
        case "sincos2d":
            return SinCos2dPositionEmbedding(num_prefix_tokens, hidden_size)
        case "none":
            return NoPositionEncoding(num_prefix_tokens)
        case "conditional":
            return ConditionalPositionEncoding(num_prefix_tokens, hidden_size)
        case "rope2d":
            return AxialRotaryEmbedding(num_prefix_tokens, hidden_size, num_heads)
    raise ValueError(f"pos_embed={kind!r} is not one of {list(get_args(PosEmbed))}")
