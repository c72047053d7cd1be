"""The model a timm state dict holds, read from its keys and shapes, built to compute as timm does.

Widths, depth, patch size, classes and the hybrid's ResNet units per stage come
from the shapes, `token` pooling from a `cls_token` (else `gap`), and the image size
from the position table's grid (or, for a Mixer or gMLP, the token-mixing width).
The number of attention heads is in no shape (qkv is 3 * width wide at any head
count): it is read from the timm model when one is given, else from timm's registry
for `name`. The model is built with timm's numerics where they differ from the
original's: exact GELU, and for the hybrids GroupNorm eps 1e-5 and kernels
standardised by sqrt(var + 1e-8) (timm's `GroupNormAct` default and
`vision_transformer_hybrid._resnetv2`'s `StdConv2dSame(eps=1e-8)`), with the same
TF "SAME" padding as ours.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from vitlab.errors import CheckpointError
from vitlab.models.checkpoints.architecture import _count_indexed, _grid_side
from vitlab.models.checkpoints.load import TIMM, copy_into, first_few
from vitlab.models.checkpoints.timm import TIMM_HEAD, TIMM_POS_EMBED, TimmSource, read_timm
from vitlab.models.gmlp import GMlp
from vitlab.models.mixer import MlpMixer
from vitlab.models.resnet import ResNetV2
from vitlab.models.vit import VisionTransformer

Arrays = dict[str, torch.Tensor]

TIMM_GROUP_NORM_EPS = 1e-5
TIMM_WEIGHT_STANDARDIZATION_EPS = 1e-8
BACKBONE = "patch_embed.backbone."
# timm ViT options our VisionTransformer does not have, each told by a key only it makes.
UNSUPPORTED = (
    ("reg_token", "register tokens (reg_tokens)"),
    ("norm_pre.", "a LayerNorm before the blocks (pre_norm, as CLIP)"),
    ("fc_norm.", "its final LayerNorm after the pooling (fc_norm); ours normalises before"),
    ("attn_pool.", "attention pooling (global_pool='map')"),
    (".ls1.", "layer scale (init_values)"),
    (".q_norm.", "query-key normalisation (qk_norm)"),
)


def from_timm(
    source: TimmSource, name: str | None = None, patch_size: int | None = None
) -> nn.Module:
    """Our ViT, hybrid, Mixer or gMLP with the weights of a timm model, computing as it does.

    `source` is a timm model, its state dict, or a `.pth` / `.pt` / `.safetensors`
    file of one. The architecture comes from the weights; `name` (a timm model name,
    e.g. "vit_base_patch16_224") is read only for what they cannot tell, a ViT's
    number of heads, and only when `source` is not the timm model itself (timm's
    registry is asked, so timm must be installed). Covers timm's `vit_*` (class
    token, or `global_pool='avg'` without one and with `fc_norm=False`), the R26/R50
    and R+ViT-Ti hybrids, `mixer_*` and `gmlp_*`; other timm options are refused
    naming them. `patch_size` other than the weights' builds a ViT or hybrid at that
    patch size, as FlexiViT converts one (kernel PI-resized, table resized by the flexi
    model's resize; see `from_official_npz`). The model takes NCHW float as the timm
    model does and is returned in eval mode.
    """
    label, arrays = read_timm(source)
    if patch_size is not None and "blocks.0.attn.qkv.weight" not in arrays:
        raise CheckpointError(
            f"{label} is not a timm ViT or hybrid; only those can take patch_size={patch_size}"
        )
    if "blocks.0.mlp_tokens.fc1.weight" in arrays:
        model = _build_mixer(label, arrays)
    elif "blocks.0.mlp_channels.gate.proj.weight" in arrays:
        model = _build_gmlp(label, arrays)
    elif "blocks.0.attn.qkv.weight" in arrays:
        model = _build_vit(label, arrays, _timm_vit(source, name), patch_size)
    else:
        raise CheckpointError(
            f"{label} is not a timm ViT, hybrid, Mixer or gMLP state dict "
            f"(keys: {first_few(sorted(arrays))})"
        )
    copy_into(model, label, arrays, TIMM)
    return model.eval()


def _timm_vit(source: TimmSource, name: str | None) -> nn.Module | None:
    """The timm model whose attributes tell what the weights cannot: `source`, or `name`'s."""
    if isinstance(source, nn.Module):
        return source
    if name is None:
        return None
    try:
        import timm
    except ImportError as error:
        raise CheckpointError(
            f"name={name!r} is looked up in timm's registry, which needs timm (`pip install timm`)"
        ) from error
    try:
        with torch.device("meta"):  # the architecture only: no memory, no initialisation
            return timm.create_model(name, pretrained=False)
    except RuntimeError as error:
        raise CheckpointError(
            f"name={name!r} is not a timm model name ({error}); "
            "`timm.list_models('vit_*')` lists them"
        ) from error


def _build_vit(
    label: str, arrays: Arrays, reference: nn.Module | None, patch_size: int | None = None
) -> VisionTransformer:
    for key_part, option in UNSUPPORTED:
        found = [key for key in arrays if key_part in key]
        if found:
            raise CheckpointError(
                f"{label} is a timm ViT with {option} ({found[0]}), which VisionTransformer "
                "does not have"
            )
    hidden_size, in_channels, file_patch_size, _ = _shape(label, arrays, "patch_embed.proj.weight")
    classifier = "token" if "cls_token" in arrays else "gap"
    num_heads = _num_heads(label, hidden_size, classifier, reference)
    stem = _build_resnet(label, arrays)
    num_tokens = _shape(label, arrays, TIMM_POS_EMBED)[1]
    if classifier == "token" and _is_square(num_tokens) and not _is_square(num_tokens - 1):
        raise CheckpointError(
            f"{label} is a timm ViT whose {TIMM_POS_EMBED} has no class-token row "
            f"({num_tokens} tokens for a class token and a square grid; no_embed_class), "
            "which VisionTransformer does not have"
        )
    grid = _grid_side(label, num_tokens - (classifier == "token"), TIMM_POS_EMBED)
    return VisionTransformer(
        image_size=grid * file_patch_size * (stem.stride if stem else 1),
        patch_size=patch_size or file_patch_size,
        num_classes=_num_classes(arrays),
        hidden_size=hidden_size,
        num_layers=_count_indexed(arrays, r"blocks\.(\d+)\."),
        num_heads=num_heads,
        mlp_dim=_shape(label, arrays, "blocks.0.mlp.fc1.weight")[0],
        num_channels=stem.conv_root.in_channels if stem else in_channels,
        classifier=classifier,
        gelu_approximate="none",
        stem=stem,
        patch_norm="patch_embed.norm.weight" in arrays,
        pos_embed="learned",
    )


def _num_heads(label: str, hidden_size: int, classifier: str, reference: nn.Module | None) -> int:
    """The heads of the timm ViT `reference` (checked against the weights); refused without one."""
    if reference is None:
        raise CheckpointError(
            f"{label}: the number of attention heads is in no shape of a timm state dict "
            f"(qkv is ({3 * hidden_size}, {hidden_size}) at any head count); pass the timm "
            "model's name, `from_timm(state_dict, name='vit_base_patch16_224')`, or the timm "
            "model itself"
        )
    width = getattr(reference, "embed_dim", None)
    if width != hidden_size:
        raise CheckpointError(
            f"{label} holds a ViT of width {hidden_size}, and the timm model it was named "
            f"as has width {width}; pass the name of the model the weights come from"
        )
    pool = getattr(reference, "global_pool", None)
    if (classifier, pool) not in (("token", "token"), ("gap", "avg")):
        raise CheckpointError(
            f"{label} is a timm ViT with global_pool={pool!r} and "
            f"{'a' if classifier == 'token' else 'no'} class token; VisionTransformer pools "
            "by the class token (global_pool='token') or, without one, by the mean (global_pool='avg')"
        )
    return reference.blocks[0].attn.num_heads


def _build_resnet(label: str, arrays: Arrays) -> ResNetV2 | None:
    """timm's hybrid backbone as our stem, computing as timm's; None if there is none."""
    roots = [f"{BACKBONE}stem.conv.weight", f"{BACKBONE}conv.weight"]  # with stages, root only
    root = next((key for key in roots if key in arrays), None)
    if root is None:
        others = sorted(key for key in arrays if key.startswith(BACKBONE))
        if others:
            raise CheckpointError(
                f"{label} has a hybrid backbone that is not timm's ResNetV2 of the R+ViT "
                f"hybrids (vit_*_r26_*, vit_*_r50_*, vit_tiny_r_s16_*): {first_few(others)}"
            )
        return None
    width, num_channels = arrays[root].shape[:2]
    stages = rf"{re.escape(BACKBONE)}stages\."
    num_layers = [
        _count_indexed(arrays, rf"{stages}{s}\.blocks\.(\d+)\.")
        for s in range(_count_indexed(arrays, rf"{stages}(\d+)\."))
    ]
    return ResNetV2(
        num_layers,
        width_factor=width / 64,
        num_channels=num_channels,
        group_norm_eps=TIMM_GROUP_NORM_EPS,
        weight_standardization_eps=TIMM_WEIGHT_STANDARDIZATION_EPS,
        weight_standardization_eps_inside_sqrt=True,
    )


def _build_mixer(label: str, arrays: Arrays) -> MlpMixer:
    hidden_dim, num_channels, patch_size, _ = _shape(label, arrays, "stem.proj.weight")
    tokens_mlp_dim, num_tokens = _shape(label, arrays, "blocks.0.mlp_tokens.fc1.weight")
    return MlpMixer(
        image_size=_grid_side(label, num_tokens, "blocks.0.mlp_tokens") * patch_size,
        patch_size=patch_size,
        num_classes=_num_classes(arrays),
        hidden_dim=hidden_dim,
        num_blocks=_count_indexed(arrays, r"blocks\.(\d+)\."),
        tokens_mlp_dim=tokens_mlp_dim,
        channels_mlp_dim=_shape(label, arrays, "blocks.0.mlp_channels.fc1.weight")[0],
        num_channels=num_channels,
        gelu_approximate="none",
        patch_norm="stem.norm.weight" in arrays,
    )


def _build_gmlp(label: str, arrays: Arrays) -> GMlp:
    hidden_dim, num_channels, patch_size, _ = _shape(label, arrays, "stem.proj.weight")
    num_tokens = _shape(label, arrays, "blocks.0.mlp_channels.gate.proj.weight")[0]
    return GMlp(
        image_size=_grid_side(label, num_tokens, "blocks.0.mlp_channels.gate") * patch_size,
        patch_size=patch_size,
        num_classes=_num_classes(arrays),
        hidden_dim=hidden_dim,
        num_blocks=_count_indexed(arrays, r"blocks\.(\d+)\."),
        ffn_dim=_shape(label, arrays, "blocks.0.mlp_channels.fc1.weight")[0],
        num_channels=num_channels,
        gelu_approximate="none",
        patch_norm="stem.norm.weight" in arrays,
    )


def _shape(label: str, arrays: Arrays, name: str) -> tuple[int, ...]:
    """The shape of the state dict's tensor `name`; CheckpointError if it has none."""
    if name not in arrays:
        raise CheckpointError(
            f"{label} has no {name!r}, so it is not a timm ViT, hybrid, Mixer or gMLP state dict "
            f"(keys: {first_few(sorted(arrays))})"
        )
    return tuple(arrays[name].shape)


def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def _num_classes(arrays: Arrays) -> int:
    return arrays[TIMM_HEAD[0]].shape[0] if TIMM_HEAD[0] in arrays else 0
