"""The model an official checkpoint holds, read from the file alone, built and loaded.

Widths, depth, heads and patch size come from the kernel shapes, `token` pooling
from a `cls` array (else `gap`), pre-logits from `pre_logits/*`, the ResNet units
per stage from `block*/unit*`, and the image size from the position table's grid
(or, for a Mixer, the token-mixing width).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from vitlab.errors import CheckpointError
from vitlab.models.checkpoints.layout import HEAD, POSEMB, PRE_LOGITS
from vitlab.models.checkpoints.load import copy_into, first_few
from vitlab.models.checkpoints.npz import Source, read_official
from vitlab.models.mixer import MlpMixer
from vitlab.models.resnet import ResNetV2
from vitlab.models.vit import VisionTransformer

Arrays = dict[str, torch.Tensor]


def from_official_npz(
    source: Source,
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    patch_size: int | None = None,
) -> nn.Module:
    """Build the ViT, hybrid or Mixer an official checkpoint holds and load it.

    The architecture comes from the file alone (always the learned position
    embedding). `num_classes=None` keeps the file's head; another count gets a fresh
    zero head. `image_size` other than the file's resizes the position table (ViT
    and hybrids only). `patch_size` other than the file's builds the model at that
    patch size, as FlexiViT converts one (ViT and hybrids only; for a hybrid, in
    cells of its ResNet's map): the kernel PI-resized, the table resized by the flexi
    model's resize. The model takes NCHW float in [-1, 1] and is returned in eval mode.
    """
    label, arrays = read_official(source)
    if "stem/kernel" in arrays:
        if patch_size is not None:
            raise CheckpointError(
                f"{label} is a Mixer, whose token-mixing MLPs are as wide as its patch grid; "
                f"it cannot take patch_size={patch_size}"
            )
        model = _build_mixer(label, arrays, num_classes, image_size)
    else:
        model = _build_vit(label, arrays, num_classes, image_size, patch_size)
    copy_into(model, label, arrays)
    return model.eval()


def _build_vit(
    label: str,
    arrays: Arrays,
    num_classes: int | None,
    image_size: int | None,
    patch_size: int | None = None,
) -> VisionTransformer:
    patch_h, patch_w, in_channels, hidden_size = _array_shape(label, arrays, "embedding/kernel")
    if patch_h != patch_w:
        raise CheckpointError(
            f"{label} has {patch_h}x{patch_w} patches; only square patches are supported"
        )
    stem = _build_resnet(label, arrays) if "conv_root/kernel" in arrays else None
    classifier = "token" if "cls" in arrays else "gap"
    num_prefix_tokens = 1 if classifier == "token" else 0
    grid = _grid_side(label, _array_shape(label, arrays, POSEMB)[1] - num_prefix_tokens, POSEMB)
    block = "Transformer/encoderblock_0/"
    return VisionTransformer(
        image_size=image_size or grid * patch_h * (stem.stride if stem else 1),
        patch_size=patch_size or patch_h,
        num_classes=_file_num_classes(arrays) if num_classes is None else num_classes,
        hidden_size=hidden_size,
        num_layers=_count_indexed(arrays, r"Transformer/encoderblock_(\d+)/"),
        num_heads=_array_shape(
            label, arrays, f"{block}MultiHeadDotProductAttention_1/query/kernel"
        )[1],
        mlp_dim=_array_shape(label, arrays, f"{block}MlpBlock_3/Dense_0/kernel")[1],
        num_channels=stem.conv_root.in_channels if stem else in_channels,
        classifier=classifier,
        representation_size=arrays[PRE_LOGITS[0]].shape[1] if PRE_LOGITS[0] in arrays else None,
        stem=stem,
        pos_embed="learned",
    )


def _build_resnet(label: str, arrays: Arrays) -> ResNetV2:
    num_channels, width = _array_shape(label, arrays, "conv_root/kernel")[2:]
    num_layers = [
        _count_indexed(arrays, rf"block{s}/unit(\d+)/") - 1
        for s in range(1, _count_indexed(arrays, r"block(\d+)/"))
    ]
    return ResNetV2(num_layers, width_factor=width / 64, num_channels=num_channels)


def _build_mixer(
    label: str, arrays: Arrays, num_classes: int | None, image_size: int | None
) -> MlpMixer:
    patch_size, _, num_channels, hidden_dim = _array_shape(label, arrays, "stem/kernel")
    token_mixing = "MixerBlock_0/token_mixing/Dense_0/kernel"
    num_tokens, tokens_mlp_dim = _array_shape(label, arrays, token_mixing)
    file_image_size = _grid_side(label, num_tokens, "MixerBlock_0/token_mixing") * patch_size
    if image_size not in (None, file_image_size):
        raise CheckpointError(
            f"{label} is a Mixer for {file_image_size}x{file_image_size} images; its token-mixing MLPs "
            f"are {num_tokens} tokens wide and cannot take image_size={image_size}. Use {file_image_size}."
        )
    channel_mixing = "MixerBlock_0/channel_mixing/Dense_0/kernel"
    return MlpMixer(
        image_size=file_image_size,
        patch_size=patch_size,
        num_classes=_file_num_classes(arrays) if num_classes is None else num_classes,
        hidden_dim=hidden_dim,
        num_blocks=_count_indexed(arrays, r"MixerBlock_(\d+)/"),
        tokens_mlp_dim=tokens_mlp_dim,
        channels_mlp_dim=_array_shape(label, arrays, channel_mixing)[1],
        num_channels=num_channels,
    )


def _array_shape(label: str, arrays: Arrays, name: str) -> tuple[int, ...]:
    """The shape of the file's array `name`; CheckpointError if the file has none."""
    if name not in arrays:
        raise CheckpointError(
            f"{label} has no {name!r}, so it is not an official ViT, hybrid or Mixer checkpoint "
            f"(keys: {first_few(sorted(arrays))})"
        )
    return tuple(arrays[name].shape)


def _count_indexed(arrays: Arrays, pattern: str) -> int:
    """1 + the largest index the regex `pattern` (one group) finds in the key names; 0 if none."""
    found = [int(m.group(1)) for name in arrays if (m := re.match(pattern, name))]
    return max(found, default=-1) + 1


def _grid_side(label: str, num_tokens: int, what: str) -> int:
    """The side of the square patch grid of `num_tokens`; CheckpointError if it is not square."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise CheckpointError(
            f"{label}: {what} has {num_tokens} patch tokens, which is not a square grid"
        )
    return side


def _file_num_classes(arrays: Arrays) -> int:
    return arrays[HEAD[0]].shape[1] if HEAD[0] in arrays else 0
