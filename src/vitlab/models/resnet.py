"""ResNetV2, the hybrid stem of R+ViT, faithful to `vit_jax/models_resnet.py`.

The original is a "ResNet v1.5 with v2 normalisation": weight-standardised convs
(`StdConv`), GroupNorm instead of BatchNorm (32 groups, eps 1e-6), and bottleneck
units with the stride on the 3x3 conv. Its root lives in `models_vit.py`; here the
root and the stages form one module so that `VisionTransformer(stem=ResNetV2(...))`
is the whole hybrid.

Flax's "SAME" padding is TensorFlow's: when the total padding is odd, the extra
row and column go at the bottom and right. PyTorch's symmetric `padding=` cannot
express that for the strided 7x7 root conv, the 3x3/2 max-pool and the strided
3x3 convs on even inputs, so those ops pad explicitly (`same_pads`, `pad_same`);
missing this moves the logits far beyond float rounding. Two speed paths sit in
`fast.py`: where SAME is symmetric (every stride-1 conv) the conv pads itself
(`fast.conv2d_padded`), and the ReLUs after GroupNorm and after the residual sum
overwrite their input (`fast.relu_in_place`).

timm's hybrids compute the same stem with other constants (GroupNorm eps 1e-5, kernels
standardised by sqrt(var + 1e-8)); `ResNetV2` takes them as arguments (`NormEps`), so
that `checkpoints/timm.py` can build a stem that computes as timm's does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.bounds import Count, Positive
from vitlab.models import fast
from vitlab.models.layers import lecun_normal_

GROUP_NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-6
WEIGHT_STANDARDIZATION_EPS = 1e-5


@dataclass(frozen=True)
class NormEps:
    """The stem's normalisation constants: the original's by default.

    Attributes:
        group_norm: GroupNorm's eps (Flax 1e-6; timm's `GroupNormAct` 1e-5).
        weight_standardization: the eps of the kernel standardisation (the original 1e-5;
            timm's hybrids 1e-8).
        inside_sqrt: standardise by sqrt(var + eps), as timm's `StdConv2dSame`, instead
            of the original's std + eps.
    """

    group_norm: float = GROUP_NORM_EPS
    weight_standardization: float = WEIGHT_STANDARDIZATION_EPS
    inside_sqrt: bool = False


def same_pads(x: torch.Tensor, kernel_size: int, stride: int) -> list[int]:
    """The TF/Flax "SAME" padding of (b, c, h, w), in `F.pad` order (left, right, top, bottom).

    The total padding per side pair is `max((out - 1) * stride + kernel_size - size, 0)`,
    out = ceil(size / stride); the larger half goes after (bottom / right).
    """
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dimension first
        total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
        pads += [total // 2, total - total // 2]
    return pads


def pad_same(x: torch.Tensor, kernel_size: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad (b, c, h, w) as TF/Flax "SAME" does, so a VALID op after it outputs ceil(size / stride)."""
    pads = same_pads(x, kernel_size, stride)
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2d(nn.Conv2d):
    """A bias-free conv whose kernel is standardised on every call (`StdConv`), with SAME padding.

    Each output filter is standardised over (in, kh, kw) as
    `(w - mean) / (std + 1e-5)` with the population std (timm's hybrids:
    `(w - mean) / sqrt(var + 1e-8)`, see `NormEps`). The stored weight stays raw,
    which is also how the official checkpoints keep it.

    Attributes:
        in_channels, out_channels: as `nn.Conv2d`.
        kernel_size: side of the square kernel.
        stride: side of the square stride.
        eps: the standardisation's eps and where it goes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        eps: NormEps = NormEps(),
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, bias=False)
        self.eps = eps
        lecun_normal_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map (b, in, h, w) -> (b, out, ceil(h / stride), ceil(w / stride))."""
        eps = self.eps.weight_standardization
        if self.eps.inside_sqrt:
            var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), correction=0, keepdim=True)
            weight = (self.weight - mean) / torch.sqrt(var + eps)
        else:
            std, mean = torch.std_mean(self.weight, dim=(1, 2, 3), correction=0, keepdim=True)
            weight = (self.weight - mean) / (std + eps)
        pads = same_pads(x, self.kernel_size[0], self.stride[0])
        # = F.conv2d(F.pad(x, pads), weight, stride), without the padded copy where it can
        return fast.conv2d_padded(x, weight, self.stride[0], pads)


def group_norm(num_channels: int, eps: float = GROUP_NORM_EPS) -> nn.GroupNorm:
    """Flax's `nn.GroupNorm()` defaults: 32 groups, eps 1e-6, scale 1, bias 0."""
    return nn.GroupNorm(GROUP_NORM_GROUPS, num_channels, eps=eps)


class ResidualUnit(nn.Module):
    """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1 (x4), each StdConv + GroupNorm, then ReLU(residual + y).

    The residual is projected (1x1 StdConv + GroupNorm) when the channels or the
    stride change. `gn3` starts with zero scale, so a fresh unit is the identity
    on its residual path.

    Attributes:
        in_channels: channels of the input map.
        features: bottleneck width; the unit outputs `features * 4` channels.
        stride: stride of the 3x3 conv and of the projection.
        eps: the normalisations' constants (`NormEps`).
    """

    def __init__(
        self, in_channels: int, features: int, stride: int = 1, eps: NormEps = NormEps()
    ) -> None:
        super().__init__()
        out_channels = features * 4
        if in_channels != out_channels or stride != 1:
            self.conv_proj = StdConv2d(in_channels, out_channels, 1, stride, eps)
            self.gn_proj = group_norm(out_channels, eps.group_norm)
        else:
            self.conv_proj = self.gn_proj = None
        self.conv1 = StdConv2d(in_channels, features, 1, eps=eps)
        self.gn1 = group_norm(features, eps.group_norm)
        self.conv2 = StdConv2d(features, features, 3, stride, eps)
        self.gn2 = group_norm(features, eps.group_norm)
        self.conv3 = StdConv2d(features, out_channels, 1, eps=eps)
        self.gn3 = group_norm(out_channels, eps.group_norm)
        nn.init.zeros_(self.gn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map (b, in, h, w) -> (b, features * 4, h / stride, w / stride)."""
        residual = x if self.conv_proj is None else self.gn_proj(self.conv_proj(x))
        y = fast.relu_in_place(self.gn1(self.conv1(x)))  # = F.relu, over its input
        y = fast.relu_in_place(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return fast.relu_in_place(residual + y)


class ResNetStage(nn.Module):
    """`block_size` units of width `features`; only the first one strides (`ResNetStage`).

    Attributes:
        in_channels: channels entering the stage.
        block_size: number of `ResidualUnit`s.
        features: bottleneck width of every unit (output is `features * 4`).
        first_stride: stride of the first unit.
        eps: the normalisations' constants (`NormEps`).
    """

    def __init__(
        self,
        in_channels: int,
        block_size: int,
        features: int,
        first_stride: int,
        eps: NormEps = NormEps(),
    ) -> None:
        super().__init__()
        self.units = nn.ModuleList(
            ResidualUnit(
                in_channels if i == 0 else features * 4,
                features,
                first_stride if i == 0 else 1,
                eps,
            )
            for i in range(block_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x


class ResNetV2(nn.Module):
    """The hybrid stem: root (StdConv 7x7/2 -> GroupNorm -> ReLU -> max-pool 3x3/2), then the stages.

    Stage i (0-based) has `num_layers[i]` units of width `width * 2**i`; the first
    stage keeps the resolution, each later one halves it. An empty `num_layers`
    is the root alone (R+ViT-Ti/16). Input is NCHW; output is the feature map
    (b, out_channels, H / stride, W / stride), rounding sizes up as SAME does.

    Attributes:
        num_layers: units per stage, e.g. (3, 4, 9) for R50+ViT-B/16, () for root only.
        width_factor: the root has `int(64 * width_factor)` channels.
        num_channels: input image channels.
        group_norm_eps: every GroupNorm's eps; the original's 1e-6 (timm's hybrids 1e-5).
        weight_standardization_eps: the conv kernels' standardisation eps; the original's
            1e-5 (timm's hybrids 1e-8).
        weight_standardization_eps_inside_sqrt: standardise kernels by sqrt(var + eps),
            as timm's hybrids, instead of the original's std + eps.
        out_channels: channels of the output map (read by `VisionTransformer`).
        stride: total downsampling of the output map (read by `VisionTransformer`).
    """

    def __init__(
        self,
        num_layers: Sequence[Count],
        width_factor: Positive = 1.0,
        num_channels: Count = 3,
        group_norm_eps: Positive = GROUP_NORM_EPS,
        weight_standardization_eps: Positive = WEIGHT_STANDARDIZATION_EPS,
        weight_standardization_eps_inside_sqrt: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = tuple(num_layers)
        self.width_factor = width_factor
        self.eps = eps = NormEps(
            group_norm_eps, weight_standardization_eps, weight_standardization_eps_inside_sqrt
        )
        width = int(64 * width_factor)
        if width % GROUP_NORM_GROUPS:
            raise ValueError(
                f"width_factor={width_factor} gives a root width of {width}, which GroupNorm's "
                f"{GROUP_NORM_GROUPS} groups do not divide; use a multiple of {GROUP_NORM_GROUPS / 64}"
            )
        self.conv_root = StdConv2d(num_channels, width, 7, stride=2, eps=eps)
        self.gn_root = group_norm(width, eps.group_norm)
        self.stages = nn.ModuleList()
        channels = width
        for i, block_size in enumerate(self.num_layers):
            self.stages.append(
                ResNetStage(channels, block_size, width * 2**i, 1 if i == 0 else 2, eps)
            )
            channels = width * 2**i * 4
        self.out_channels = channels
        self.stride = self.stride_of(self.num_layers)

    @staticmethod
    def stride_of(num_layers: Sequence[int]) -> int:
        """The downsampling of a stem with these stages: 4 for the root (conv /2, pool /2), x2 per later stage."""
        return 4 * 2 ** max(len(num_layers) - 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (b, c, H, W) -> the feature map (b, out_channels, H / stride, W / stride)."""
        x = fast.relu_in_place(self.gn_root(self.conv_root(x)))
        x = F.max_pool2d(pad_same(x, 3, 2, value=-math.inf), kernel_size=3, stride=2)
        for stage in self.stages:
            x = stage(x)
        return x
