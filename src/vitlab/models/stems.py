"""The stems a VisionTransformer can put between the image and its patch embedding.

`model.stem` names one (`build_stem`):

- `patch` (the default, the original ViT): no stem; the patch embedding cuts the
  image into `patch_size`-pixel patches itself.
- `conv`: the convolutional stem of Xiao et al. (2021), "Early Convolutions Help
  Transformers See Better" (their ViT_C): 3x3 stride-2 convolutions, each with
  BatchNorm and ReLU, as many as make a total stride of `patch_size`; the patch
  embedding over its map, with patches of one cell, is the paper's closing 1x1
  convolution to the width.
- `patchify_ln`: ConvNeXt's stem (Liu et al., 2022): a 4x4 stride-4 convolution
  and a LayerNorm over the channels; the patch embedding then cuts
  `patch_size / 4`-cell patches from its (H/4, W/4) map.
- `resnet`: the R+ViT hybrids' `ResNetV2` (`resnet.py`).

`patch_size` is in pixels for `patch`, `conv` and `patchify_ln` (the tokens are
`patch_size`-pixel squares whichever of them is used), but for `resnet`, as in the
original hybrid configs, it counts cells of the ResNet's feature map (R50+ViT-B/16
has `patch_size` 1 on a /16 map). Every stem has `out_channels` and `stride`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from vitlab.errors import ConfigError
from vitlab.models.layers import LAYER_NORM_EPS
from vitlab.models.resnet import ResNetV2

StemKind = Literal["patch", "conv", "patchify_ln", "resnet"]
# The stems whose stride is part of a `patch_size`-pixel patch (not the hybrids' convention).
PIXEL_STEMS = ("conv", "patchify_ln")
PATCHIFY_STRIDE = 4
# The default `resnet_layers`: R50 cut to three stages, as R50+ViT-B/16.
RESNET_LAYERS = (3, 4, 9)


class ConvBNReLU(nn.Module):
    """One layer of the convolutional stem: 3x3 conv (stride 2, padding 1, no bias) -> BatchNorm -> ReLU.

    Attributes:
        in_channels, out_channels: as `nn.Conv2d`.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map (b, in, h, w) -> (b, out, ceil(h / 2), ceil(w / 2))."""
        return self.relu(self.bn(self.conv(x)))


class ConvStem(nn.Module):
    """ViT_C's stem: `len(widths)` ConvBNReLU layers, each halving the resolution.

    The closing 1x1 convolution of the paper is not here: it is the patch embedding
    over this map (`PatchEmbed` with patches of one cell), so `patch_norm` and the
    channels-last knob treat it as they treat every patch projection. The 3x3
    convolutions and BatchNorms keep PyTorch's default init, as pycls does.
    BatchNorm keeps running statistics (used in eval mode) and, under DDP, normalises
    over each device's share of the batch.

    Attributes:
        in_channels: input image channels.
        widths: output channels of each 3x3 convolution; see `conv_stem_widths`.
        out_channels: channels of the output map, `widths[-1]`.
        stride: total downsampling, `2 ** len(widths)`.
    """

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        channels = [in_channels, *widths]
        self.layers = nn.ModuleList(ConvBNReLU(a, b) for a, b in itertools.pairwise(channels))
        self.out_channels = channels[-1]
        self.stride = 2 ** len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (b, c, H, W) -> the feature map (b, out_channels, H / stride, W / stride)."""
        for layer in self.layers:
            x = layer(x)
        return x


def conv_stem_widths(hidden_size: int, patch_size: int) -> list[int]:
    """The widths of the 3x3 convolutions of a `patch_size` conv stem for a ViT of `hidden_size`.

    The paper's rule for its ViT_C-1GF and -4GF stems: one stride-2 convolution per
    factor 2 of `patch_size`, the width doubling at each and the last one as wide as
    the transformer (192: 24, 48, 96, 192; 384: 48, 96, 192, 384). Its larger
    18GF/36GF stems (six convolutions, some of stride 1) are not this rule.
    """
    count = round(math.log2(patch_size))
    return [max(1, hidden_size // 2 ** (count - 1 - i)) for i in range(count)]


class PatchifyLN(nn.Module):
    """ConvNeXt's stem: a 4x4 stride-4 convolution, then LayerNorm over the channels.

    The conv keeps ConvNeXt's init (truncated normal, std 0.02; zero bias) and the
    LayerNorm its eps (1e-6, as the rest of the model).

    Attributes:
        in_channels: input image channels.
        out_channels: channels of the output map; see `patchify_width`.
        stride: 4.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, PATCHIFY_STRIDE, stride=PATCHIFY_STRIDE)
        self.norm = nn.LayerNorm(out_channels, eps=LAYER_NORM_EPS)
        self.out_channels = out_channels
        self.stride = PATCHIFY_STRIDE
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (b, c, H, W) -> the normalised map (b, out_channels, H / 4, W / 4)."""
        x = rearrange(self.proj(x), "b c h w -> b h w c")
        return rearrange(self.norm(x), "b h w c -> b c h w")


def patchify_width(hidden_size: int, patch_size: int) -> int:
    """The width of the `patchify_ln` map: each `patch_size` patch then holds `hidden_size` values.

    (patch_size / 4)² cells of `hidden_size * 16 / patch_size²` channels, so the patch
    projection is square, as ViT-B/16's is (16 * 16 * 3 = 768 values into 768).
    """
    return max(1, hidden_size * PATCHIFY_STRIDE**2 // patch_size**2)


def encoder_depth(kind: object, num_layers: int) -> int:
    """The encoder blocks a ViT with this stem has: one fewer for `conv`, as Xiao et al. do.

    The paper's ViT_C replaces the patchify projection with the conv stack and removes
    one transformer block, so that it costs about what the ViT_P it is compared with
    costs; `num_layers` stays the depth of that ViT_P (12 for ViT-B), so a
    `model.stem=patch,conv` sweep compares models of equal compute.
    """
    if kind != "conv":
        return num_layers
    if num_layers < 2:
        raise ConfigError(
            f"model.num_layers={num_layers} is not valid with model.stem=conv: the conv stem "
            "takes the place of one encoder block (Xiao et al.), so it needs num_layers >= 2"
        )
    return num_layers - 1


def stem_patch_problem(kind: object, patch_size: int) -> str | None:
    """Why stem `kind` cannot make `patch_size` patches, or None if it can.

    `build_stem` raises it as a ConfigError; `vitlab.runs.validate` reports it with the
    other problems of a config.
    """
    if kind == "conv" and (patch_size < 2 or patch_size & (patch_size - 1)):
        return (
            "model.stem=conv halves the resolution with each of its convolutions, so its "
            "stride, the patch size, must be a power of two >= 2: 2, 4, 8, 16, 32, ..."
        )
    if kind == "patchify_ln" and patch_size % PATCHIFY_STRIDE:
        return (
            f"model.stem=patchify_ln cuts {PATCHIFY_STRIDE}x{PATCHIFY_STRIDE} pixels first, so "
            "the patch size must be a multiple of 4: 4, 8, 12, 16, ..."
        )
    return None


def build_stem(
    kind: StemKind | nn.Module | None,
    *,
    num_channels: int,
    hidden_size: int,
    patch_size: int,
    resnet_layers: Sequence[int] = RESNET_LAYERS,
    resnet_width_factor: float = 1.0,
) -> tuple[nn.Module | None, int]:
    """The stem `kind` names, and the patch size of the patch embedding over its map.

    A module is used as it is (a hybrid built by hand or by `from_official_npz`), and
    None is `patch`; both keep `patch_size` as the embedding's. `resnet_layers` and
    `resnet_width_factor` are read for `resnet` only. Raises ConfigError naming
    `model.patch_size` when the stem cannot make such patches.
    """
    if kind is None or isinstance(kind, nn.Module):
        return kind, patch_size
    problem = stem_patch_problem(kind, patch_size)
    if problem:
        raise ConfigError(f"model.patch_size={patch_size} is not valid: {problem}")
    if kind == "patch":
        return None, patch_size
    if kind == "conv":
        return ConvStem(num_channels, conv_stem_widths(hidden_size, patch_size)), 1
    if kind == "patchify_ln":
        width = patchify_width(hidden_size, patch_size)
        return PatchifyLN(num_channels, width), patch_size // PATCHIFY_STRIDE
    if kind == "resnet":
        resnet = ResNetV2(
            resnet_layers, width_factor=resnet_width_factor, num_channels=num_channels
        )
        return resnet, patch_size
    raise ConfigError(f"model.stem={kind!r} is not one of 'patch', 'conv', 'patchify_ln', 'resnet'")
