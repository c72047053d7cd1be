"""The official `.npz` layout of our models: every parameter tied to its official arrays.

The published checkpoints of google-research/vision_transformer are flat archives
of Flax parameters named by module path (`Transformer/encoderblock_0/LayerNorm_0/scale`).
Each of our parameters is tied to the official arrays it is made of by a `_Link`,
whose einops pattern converts the layout one way and, read backwards, the other.
So one table serves loading, exporting and checking.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import nn

from vitlab.errors import CheckpointError
from vitlab.models.mixer import MlpMixer
from vitlab.models.pos_embed import LearnedPositionEmbedding
from vitlab.models.resnet import ResNetV2
from vitlab.models.vit import VisionTransformer

POSEMB = "Transformer/posembed_input/pos_embedding"
HEAD = ("head/kernel", "head/bias")
PRE_LOGITS = ("pre_logits/kernel", "pre_logits/bias")


@dataclass(frozen=True)
class _Link:
    """One of our parameters and the official arrays it is made of.

    Attributes:
        ours: our state-dict key.
        official: the official names; three (query, key, value) for the fused qkv.
        pattern: einops pattern from the official layout (stacked when several) to ours.
        axes: axis sizes the pattern needs when read backwards.
    """

    ours: str
    official: tuple[str, ...]
    pattern: str = "... -> ..."
    axes: dict[str, int] = field(default_factory=dict)

    def to_ours(self, arrays: list[torch.Tensor]) -> torch.Tensor:
        return rearrange(arrays[0] if len(arrays) == 1 else arrays, self.pattern, **self.axes)

    def to_official(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        theirs, ours = self.pattern.split("->")
        arrays = rearrange(tensor, f"{ours} -> {theirs}", **self.axes)
        return [arrays] if len(self.official) == 1 else list(arrays.unbind(0))


def _dense(official: str, ours: str) -> Iterator[_Link]:
    yield _Link(f"{ours}.weight", (f"{official}/kernel",), "i o -> o i")
    yield _Link(f"{ours}.bias", (f"{official}/bias",))


def _conv(official: str, ours: str, bias: bool = True) -> Iterator[_Link]:
    yield _Link(f"{ours}.weight", (f"{official}/kernel",), "h w i o -> o i h w")
    if bias:
        yield _Link(f"{ours}.bias", (f"{official}/bias",))


def _norm(official: str, ours: str) -> Iterator[_Link]:
    yield _Link(f"{ours}.weight", (f"{official}/scale",))
    yield _Link(f"{ours}.bias", (f"{official}/bias",))


def _attention(official: str, ours: str, num_heads: int) -> Iterator[_Link]:
    qkv = tuple(f"{official}/{part}" for part in ("query", "key", "value"))
    axes = {"three": 3, "h": num_heads}
    yield _Link(
        f"{ours}.qkv.weight",
        tuple(f"{n}/kernel" for n in qkv),
        "three i h d -> (three h d) i",
        axes,
    )
    yield _Link(
        f"{ours}.qkv.bias", tuple(f"{n}/bias" for n in qkv), "three h d -> (three h d)", axes
    )
    yield _Link(
        f"{ours}.out.weight", (f"{official}/out/kernel",), "h d o -> o (h d)", {"h": num_heads}
    )
    yield _Link(f"{ours}.out.bias", (f"{official}/out/bias",))


def _resnet_links(stem: ResNetV2, ours: str) -> Iterator[_Link]:
    yield from _conv("conv_root", f"{ours}conv_root", bias=False)
    yield from _norm("gn_root", f"{ours}gn_root")
    for s, stage in enumerate(stem.stages):
        for u, unit in enumerate(stage.units):
            official, mine = f"block{s + 1}/unit{u + 1}/", f"{ours}stages.{s}.units.{u}."
            parts = ("1", "2", "3") if unit.conv_proj is None else ("1", "2", "3", "_proj")
            for part in parts:
                yield from _conv(f"{official}conv{part}", f"{mine}conv{part}", bias=False)
                yield from _norm(f"{official}gn{part}", f"{mine}gn{part}")


def _vit_links(model: VisionTransformer) -> Iterator[_Link]:
    if not isinstance(model.pos_embed, LearnedPositionEmbedding):
        raise CheckpointError(
            f"official checkpoint files have a learned position embedding ({POSEMB}), and this "
            f"model uses pos_embed={model.pos_embed.kind!r}; set `model.pos_embed=learned` to load "
            "or export one (no other encoding has an official counterpart: sincos2d, none and "
            "rope2d have no table, conditional's PEG conv is not in the files)"
        )
    if model.stem is not None:
        if not isinstance(model.stem, ResNetV2):
            raise CheckpointError(
                f"official hybrid checkpoints hold a ResNetV2 stem, not {type(model.stem).__name__}"
            )
        yield from _resnet_links(model.stem, "stem.")
    yield from _conv("embedding", "patch_embed.proj")
    if model.cls_token is not None:
        yield _Link("cls_token", ("cls",))
    yield _Link("pos_embed.pos_embedding", (POSEMB,))
    for i, block in enumerate(model.blocks):
        official, ours = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        yield from _norm(f"{official}LayerNorm_0", f"{ours}norm1")
        yield from _attention(
            f"{official}MultiHeadDotProductAttention_1", f"{ours}attn", block.attn.num_heads
        )
        yield from _norm(f"{official}LayerNorm_2", f"{ours}norm2")
        yield from _dense(f"{official}MlpBlock_3/Dense_0", f"{ours}mlp.fc1")
        yield from _dense(f"{official}MlpBlock_3/Dense_1", f"{ours}mlp.fc2")
    yield from _norm("Transformer/encoder_norm", "norm")
    if isinstance(model.pre_logits, nn.Sequential):
        yield from _dense("pre_logits", "pre_logits.0")
    if model.num_classes:
        yield from _dense("head", "head")


def _mixer_links(model: MlpMixer) -> Iterator[_Link]:
    yield from _conv("stem", "stem.proj")
    for i in range(len(model.blocks)):
        official, ours = f"MixerBlock_{i}/", f"blocks.{i}."
        yield from _norm(f"{official}LayerNorm_0", f"{ours}norm1")
        yield from _dense(f"{official}token_mixing/Dense_0", f"{ours}token_mixing.fc1")
        yield from _dense(f"{official}token_mixing/Dense_1", f"{ours}token_mixing.fc2")
        yield from _norm(f"{official}LayerNorm_1", f"{ours}norm2")
        yield from _dense(f"{official}channel_mixing/Dense_0", f"{ours}channel_mixing.fc1")
        yield from _dense(f"{official}channel_mixing/Dense_1", f"{ours}channel_mixing.fc2")
    yield from _norm("pre_head_layer_norm", "pre_head_layer_norm")
    if model.num_classes:
        yield from _dense("head", "head")


def official_links(model: nn.Module) -> list[_Link]:
    """The official layout of `model`: every parameter tied to its official arrays.

    Raises CheckpointError for a model the official files cannot hold: another class,
    another position encoding or stem, or parameters the original does not have.
    """
    if isinstance(model, VisionTransformer):
        links = list(_vit_links(model))
    elif isinstance(model, MlpMixer):
        links = list(_mixer_links(model))
    else:
        raise CheckpointError(
            f"official checkpoints hold a VisionTransformer or an MlpMixer, not {type(model).__name__}"
        )
    unlinked = sorted(set(model.state_dict()) - {link.ours for link in links})
    if unlinked:
        raise CheckpointError(
            f"{type(model).__name__} has parameters the official layout does not have: {unlinked}; "
            "only the original architecture (learned position embedding, ...) can load or export it"
        )
    return links


def official_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s parameters under their official names and in the official layouts."""
    state = model.state_dict()
    return {
        name: array
        for link in official_links(model)
        for name, array in zip(link.official, link.to_official(state[link.ours]), strict=True)
    }
