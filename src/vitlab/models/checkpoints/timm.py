"""timm's layout of our models: every parameter tied to its timm state-dict key, and timm files read.

timm's ViTs, hybrids, Mixers and gMLPs hold the same tensors as ours in the same
layouts (a fused qkv split as (three heads head_dim), (out, in) Linear weights, OIHW
convs), under other names; so each `_Link` here renames (pattern `... -> ...`) and
one table serves loading a timm state dict and writing one (`to_timm`). timm's
hybrid backbone is `patch_embed.backbone`, with the root under `stem.` when it has
stages and alone (`conv`, `norm`) when it has none (R+ViT-Ti).

Files: `.pth` / `.pt` (`torch.save` of a state dict, or of a dict holding one under
`state_dict` or `model`, read with `weights_only=True`) and `.safetensors`.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from vitlab.errors import CheckpointError
from vitlab.models.checkpoints.layout import _Link
from vitlab.models.gmlp import GMlp
from vitlab.models.layers import PatchEmbed
from vitlab.models.mixer import MlpMixer
from vitlab.models.pos_embed import LearnedPositionEmbedding
from vitlab.models.resnet import ResNetV2
from vitlab.models.vit import VisionTransformer

TimmSource = nn.Module | Mapping[str, torch.Tensor] | str | Path

TIMM_SUFFIXES = (".pth", ".pt", ".safetensors")
TIMM_POS_EMBED = "pos_embed"
TIMM_HEAD = ("head.weight", "head.bias")
# The keys a training checkpoint keeps the model's state dict under (timm's train.py: state_dict).
NESTED = ("state_dict", "model")
DDP_PREFIX = "module."


def _same(ours: str, theirs: str, params: tuple[str, ...] = ("weight", "bias")) -> Iterator[_Link]:
    """Links for the parameters `params` of our module `ours` and timm's module `theirs`."""
    for param in params:
        yield _Link(f"{ours}.{param}", (f"{theirs}.{param}",))


def _patch_embed_links(embed: PatchEmbed, name: str) -> Iterator[_Link]:
    """The patch projection and its optional LayerNorm (timm's `embed_norm_layer` / `stem_norm`)."""
    yield from _same(f"{name}.proj", f"{name}.proj")
    if isinstance(embed.norm, nn.LayerNorm):
        yield from _same(f"{name}.norm", f"{name}.norm")


def _resnet_links(stem: ResNetV2, theirs: str) -> Iterator[_Link]:
    root = f"{theirs}stem." if stem.stages else theirs
    yield from _same("stem.conv_root", f"{root}conv", ("weight",))
    yield from _same("stem.gn_root", f"{root}norm")
    for s, stage in enumerate(stem.stages):
        for u, unit in enumerate(stage.units):
            ours, block = f"stem.stages.{s}.units.{u}.", f"{theirs}stages.{s}.blocks.{u}."
            for part in ("1", "2", "3"):
                yield from _same(f"{ours}conv{part}", f"{block}conv{part}", ("weight",))
                yield from _same(f"{ours}gn{part}", f"{block}norm{part}")
            if unit.conv_proj is not None:
                yield from _same(f"{ours}conv_proj", f"{block}downsample.conv", ("weight",))
                yield from _same(f"{ours}gn_proj", f"{block}downsample.norm")


def _vit_links(model: VisionTransformer) -> Iterator[_Link]:
    if not isinstance(model.pos_embed, LearnedPositionEmbedding):
        raise CheckpointError(
            f"timm's ViTs have a learned position table ({TIMM_POS_EMBED}), and this model uses "
            f"pos_embed={model.pos_embed.kind!r}; set `model.pos_embed=learned` to load or "
            "write a timm state dict"
        )
    if model.stem is not None:
        if not isinstance(model.stem, ResNetV2):
            raise CheckpointError(
                f"timm's hybrids have a ResNetV2 backbone, not {type(model.stem).__name__}"
            )
        yield from _resnet_links(model.stem, "patch_embed.backbone.")
    if isinstance(model.pre_logits, nn.Sequential):
        raise CheckpointError(
            "timm's ViTs have no pre-logits layer; this model has representation_size="
            f"{model.pre_logits[0].out_features}; set `model.representation_size=null`"
        )
    yield from _patch_embed_links(model.patch_embed, "patch_embed")
    if model.cls_token is not None:
        yield _Link("cls_token", ("cls_token",))
    yield _Link("pos_embed.pos_embedding", (TIMM_POS_EMBED,))
    for i in range(len(model.blocks)):
        ours = theirs = f"blocks.{i}."
        yield from _same(f"{ours}norm1", f"{theirs}norm1")
        yield from _same(f"{ours}attn.qkv", f"{theirs}attn.qkv")  # both (three h d) x d
        yield from _same(f"{ours}attn.out", f"{theirs}attn.proj")
        yield from _same(f"{ours}norm2", f"{theirs}norm2")
        yield from _same(f"{ours}mlp.fc1", f"{theirs}mlp.fc1")
        yield from _same(f"{ours}mlp.fc2", f"{theirs}mlp.fc2")
    yield from _same("norm", "norm")
    if model.num_classes:
        yield from _same("head", "head")


def _mixer_links(model: MlpMixer) -> Iterator[_Link]:
    yield from _patch_embed_links(model.stem, "stem")
    for i in range(len(model.blocks)):
        ours = theirs = f"blocks.{i}."
        yield from _same(f"{ours}norm1", f"{theirs}norm1")
        yield from _same(f"{ours}token_mixing.fc1", f"{theirs}mlp_tokens.fc1")
        yield from _same(f"{ours}token_mixing.fc2", f"{theirs}mlp_tokens.fc2")
        yield from _same(f"{ours}norm2", f"{theirs}norm2")
        yield from _same(f"{ours}channel_mixing.fc1", f"{theirs}mlp_channels.fc1")
        yield from _same(f"{ours}channel_mixing.fc2", f"{theirs}mlp_channels.fc2")
    yield from _same("pre_head_layer_norm", "norm")
    if model.num_classes:
        yield from _same("head", "head")


def _gmlp_links(model: GMlp) -> Iterator[_Link]:
    yield from _patch_embed_links(model.stem, "stem")
    for i in range(len(model.blocks)):
        ours, theirs = f"blocks.{i}.", f"blocks.{i}.mlp_channels."
        yield from _same(f"{ours}norm", f"blocks.{i}.norm")
        yield from _same(f"{ours}channel_proj1", f"{theirs}fc1")
        yield from _same(f"{ours}sgu.norm", f"{theirs}gate.norm")
        yield from _same(f"{ours}sgu.spatial_proj", f"{theirs}gate.proj")
        yield from _same(f"{ours}channel_proj2", f"{theirs}fc2")
    yield from _same("norm", "norm")
    if model.num_classes:
        yield from _same("head", "head")


def timm_links(model: nn.Module) -> list[_Link]:
    """timm's layout of `model`: every parameter tied to its timm state-dict key.

    Raises CheckpointError for a model timm's state dicts cannot hold: another class,
    position encoding or stem, pre-logits, or parameters timm's models do not have.
    """
    if isinstance(model, VisionTransformer):
        links = list(_vit_links(model))
    elif isinstance(model, MlpMixer):
        links = list(_mixer_links(model))
    elif isinstance(model, GMlp):
        links = list(_gmlp_links(model))
    else:
        raise CheckpointError(
            "timm state dicts map to a VisionTransformer, an MlpMixer or a GMlp, "
            f"not {type(model).__name__}"
        )
    unlinked = sorted(set(model.state_dict()) - {link.ours for link in links})
    if unlinked:
        raise CheckpointError(
            f"{type(model).__name__} has parameters timm's models do not have: {unlinked}"
        )
    return links


def to_timm(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict under timm's keys: what `timm_model.load_state_dict` takes.

    For the timm model of the same architecture (`from_timm` is the inverse).
    """
    state = model.state_dict()
    return {link.official[0]: state[link.ours] for link in timm_links(model)}


def is_timm_file(source: object) -> bool:
    """Whether `source` is a path whose suffix names a timm/PyTorch weights file."""
    return isinstance(source, str | Path) and Path(source).suffix.lower() in TIMM_SUFFIXES


def read_timm(source: TimmSource) -> tuple[str, dict[str, torch.Tensor]]:
    """(a label naming the source for messages, its tensors under timm's keys).

    `source` is a timm model, a state dict, or a `.pth` / `.pt` / `.safetensors`
    path; a training checkpoint's `state_dict` / `model` entry and DDP's `module.`
    prefix are unwrapped. Raises CheckpointError naming the path when it is missing
    or not such a file.
    """
    if isinstance(source, nn.Module):
        return f"the given {type(source).__name__} module", dict(source.state_dict())
    if isinstance(source, Mapping):
        return "the given state dict", _state_dict("the given state dict", source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"pretrained checkpoint {path} does not exist or is not a file "
            f"(resolved: {path.resolve()})"
        )
    if path.suffix.lower() not in TIMM_SUFFIXES:
        raise CheckpointError(
            f"pretrained checkpoint {path}: timm weights are read from {list(TIMM_SUFFIXES)} "
            "files (official .npz files through `from_official_npz` / `load_pretrained`)"
        )
    return str(path), _state_dict(str(path), _load_file(path))


def _load_file(path: Path) -> object:
    """What a `.safetensors` or `.pth` / `.pt` file holds; CheckpointError if it is unreadable."""
    try:
        if path.suffix.lower() == ".safetensors":
            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except (
        SafetensorError,
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as error:
        raise CheckpointError(
            f"pretrained checkpoint {path} is not a readable {path.suffix} file of weights "
            f"({type(error).__name__}: {(str(error).splitlines() or [''])[0]}); "
            "is it truncated, or another format? (.pth files are read with weights_only=True: "
            "tensors and plain containers only)"
        ) from error


def _state_dict(label: str, loaded: object) -> dict[str, torch.Tensor]:
    """The tensors of a loaded file or mapping by key, unwrapped from a training checkpoint."""
    if isinstance(loaded, Mapping):
        for key in NESTED:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise CheckpointError(f"{label} holds no state dict (a mapping of names to tensors)")
    not_tensors = sorted(str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(
            f"{label} is not a state dict: {not_tensors[:5]} are not tensors "
            f"(a training checkpoint keeps the weights under one of {list(NESTED)})"
        )
    if all(k.startswith(DDP_PREFIX) for k in loaded):
        return {k.removeprefix(DDP_PREFIX): v for k, v in loaded.items()}
    return dict(loaded)
