"""Official `.npz` checkpoints <-> our models.

The published checkpoints of google-research/vision_transformer (`ViT-B_16.npz`,
`Mixer-B_16.npz`, `R50+ViT-B_16.npz`, the AugReg files, ...) are flat archives of
Flax parameters named by module path (`Transformer/encoderblock_0/LayerNorm_0/scale`).
Each of our parameters is tied to the official arrays it is made of by a `_Link`,
whose einops pattern converts the layout one way and, read backwards, the other.
So one table serves loading, exporting and checking: a file is compared with the
model key by key and shape by shape before anything is copied.

Loading follows the original's fine-tuning (`vit_jax/checkpoint.py:load_pretrained`):
a head of another size stays freshly zero-initialised, a file's pre-logits are
dropped (with its head) when the model has none, and the learned position table
is resized bilinearly to the model's patch grid. Official files always hold a
learned position table, so only a `pos_embed="learned"` ViT loads or exports them.
"""

from __future__ import annotations

import math
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn

from vitlab.errors import CheckpointError
from vitlab.models.mixer import MlpMixer
from vitlab.models.pos_embed import LearnedPositionEmbedding, resize_learned_posemb
from vitlab.models.resnet import ResNetV2
from vitlab.models.vit import VisionTransformer

Source = str | Path | Mapping[str, np.ndarray]

# Checkpoints written by the pre-Linen training code nest the parameters here.
OFFICIAL_PREFIX = "opt/target/"
POSEMB = "Transformer/posembed_input/pos_embedding"
HEAD = ("head/kernel", "head/bias")
PRE_LOGITS = ("pre_logits/kernel", "pre_logits/bias")
# Hybrid GroupNorm scale/bias are stored (1, 1, 1, C) in the published files (flax#1721).
_GROUP_NORM_PARAM = re.compile(r"(^|/)gn(\d+|_root|_proj)/(scale|bias)$")
_MAX_LISTED = 12


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


def _links(model: nn.Module) -> list[_Link]:
    """The official layout of `model`: every parameter tied to its official arrays."""
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


def _official_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {
        name: array
        for link in _links(model)
        for name, array in zip(link.official, link.to_official(state[link.ours]), strict=True)
    }


def to_official(model: nn.Module) -> dict[str, np.ndarray]:
    """A ViT, hybrid or Mixer as official float32 arrays, named as in the published `.npz` files.

    The inverse of `load_pretrained`: `np.savez(path, **to_official(model))` writes a
    file the original code (and timm's npz loader) reads. Hybrid GroupNorm
    parameters come out (C,), as the current Flax code holds them.
    """
    return {
        name: t.detach().to("cpu", torch.float32).numpy()
        for name, t in _official_tensors(model).items()
    }


def save_official_npz(model: nn.Module, path: str | Path) -> Path:
    """Write `to_official(model)` to `path` as an uncompressed `.npz`; returns the path."""
    path = Path(path)
    np.savez(path, **to_official(model))
    return path


def _read(source: Source) -> tuple[str, dict[str, torch.Tensor]]:
    """(a label naming the source, its arrays with the `opt/target/` prefix and GroupNorm shapes undone)."""
    if isinstance(source, Mapping):
        label, arrays = "the given checkpoint (a mapping of arrays)", dict(source)
    else:
        path = Path(source).expanduser()
        label = str(path)
        if not path.is_file():
            raise CheckpointError(
                f"pretrained checkpoint {path} does not exist or is not a file "
                f"(resolved: {path.resolve()})"
            )
        arrays = _read_npz(path)
    if any(name.startswith(OFFICIAL_PREFIX) for name in arrays):
        arrays = {
            n.removeprefix(OFFICIAL_PREFIX): a
            for n, a in arrays.items()
            if n.startswith(OFFICIAL_PREFIX)
        }
    tensors = {}
    for name, array in arrays.items():
        tensor = torch.as_tensor(np.asarray(array))
        if _GROUP_NORM_PARAM.search(name) and tensor.ndim == 4:
            tensor = rearrange(tensor, "1 1 1 c -> c")
        tensors[name] = tensor
    return label, tensors


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise CheckpointError(
            f"pretrained checkpoint {path} is not a readable .npz archive "
            f"({type(error).__name__}: {error}); is it truncated, or another format?"
        ) from error
    raise CheckpointError(
        f"pretrained checkpoint {path} holds a single .npy array, not an .npz archive of named parameters"
    )


def _adapt(
    model: nn.Module, arrays: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The file's arrays made to fit a fine-tuning model, as the original's `load_pretrained` does."""
    arrays = dict(arrays)
    drop_head = False
    if PRE_LOGITS[0] in arrays and PRE_LOGITS[0] not in own:  # the original's "drop-head variant"
        for name in PRE_LOGITS:
            arrays.pop(name, None)
        drop_head = True
    if drop_head or any(
        name not in arrays or name not in own or arrays[name].shape != own[name].shape
        for name in HEAD
    ):
        for name in HEAD:  # a new task: keep the model's own (zero) head
            arrays.pop(name, None)
            if name in own:
                arrays[name] = own[name]
    if POSEMB in arrays and POSEMB in own and arrays[POSEMB].shape != own[POSEMB].shape:
        arrays[POSEMB] = _resize_posemb(model, arrays[POSEMB], own[POSEMB])
    return arrays


def _resize_posemb(model: nn.Module, posemb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The file's table resampled to the model's grid; left as is when it cannot be (reported as mis-shaped)."""
    prefix = model.num_prefix_tokens
    side = math.isqrt(posemb.shape[1] - prefix)
    if (
        posemb.ndim != 3
        or posemb.shape[2] != target.shape[2]
        or side * side != posemb.shape[1] - prefix
    ):
        return posemb
    return resize_learned_posemb(posemb.float(), prefix, (side, side), model.pos_embed.grid)


def _listed(lines: list[str]) -> list[str]:
    if len(lines) > _MAX_LISTED:
        return [*lines[:_MAX_LISTED], f"... and {len(lines) - _MAX_LISTED} more"]
    return lines


def _check(label: str, arrays: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Raise `CheckpointError` listing every missing, unexpected and mis-shaped key."""
    missing = [f"{n} {tuple(a.shape)}" for n, a in own.items() if n not in arrays]
    unexpected = [f"{n} {tuple(a.shape)}" for n, a in arrays.items() if n not in own]
    misshaped = [
        f"config expects {n} {tuple(a.shape)} but file has {tuple(arrays[n].shape)}"
        for n, a in own.items()
        if n in arrays and arrays[n].shape != a.shape
    ]
    if not (missing or unexpected or misshaped):
        return
    report = [f"{label} does not fit the configured architecture:"]
    for title, lines in (
        ("missing from the file", missing),
        ("in the file but not in the model", unexpected),
        ("mis-shaped", misshaped),
    ):
        if lines:
            report += [f"  {title} ({len(lines)}):", *(f"    {line}" for line in _listed(lines))]
    report.append(
        "  (`vitlab.models.from_official_npz(path)` builds the architecture a file holds)"
    )
    raise CheckpointError("\n".join(report))


def _load(model: nn.Module, label: str, arrays: dict[str, torch.Tensor]) -> None:
    own = _official_tensors(model)
    arrays = _adapt(model, arrays, own)
    _check(label, arrays, own)
    state = model.state_dict()
    model.load_state_dict(
        {
            link.ours: link.to_ours([arrays[name] for name in link.official]).to(
                state[link.ours].dtype
            )
            for link in _links(model)
        }
    )


def load_pretrained(model: nn.Module, source: Source) -> None:
    """Copy an official checkpoint into an already built ViT, hybrid or Mixer, in place.

    `source` is a path to an `.npz` or a mapping name -> array. The model's
    architecture must match the file's; a head of another size (fine-tuning on a
    new dataset) stays the model's fresh zero head, and a different patch grid gets
    the file's position table resized. Anything else that differs raises
    `CheckpointError` listing the keys and shapes, before the model is touched.
    """
    _load(model, *_read(source))


def _shape(label: str, arrays: dict[str, torch.Tensor], name: str) -> tuple[int, ...]:
    if name not in arrays:
        raise CheckpointError(
            f"{label} has no {name!r}, so it is not an official ViT, hybrid or Mixer checkpoint "
            f"(keys: {_listed(sorted(arrays))})"
        )
    return tuple(arrays[name].shape)


def _count(arrays: dict[str, torch.Tensor], pattern: str) -> int:
    """1 + the largest index the regex `pattern` (one group) finds in the key names; 0 if none."""
    found = [int(m.group(1)) for name in arrays if (m := re.match(pattern, name))]
    return max(found, default=-1) + 1


def _grid_side(label: str, num_tokens: int, what: str) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise CheckpointError(
            f"{label}: {what} has {num_tokens} patch tokens, which is not a square grid"
        )
    return side


def _build_vit(
    label: str, arrays: dict[str, torch.Tensor], num_classes: int | None, image_size: int | None
) -> VisionTransformer:
    patch_h, patch_w, in_channels, hidden_size = _shape(label, arrays, "embedding/kernel")
    if patch_h != patch_w:
        raise CheckpointError(
            f"{label} has {patch_h}x{patch_w} patches; only square patches are supported"
        )
    stem = None
    if "conv_root/kernel" in arrays:
        num_channels, width = _shape(label, arrays, "conv_root/kernel")[2:]
        num_layers = [
            _count(arrays, rf"block{s}/unit(\d+)/") - 1
            for s in range(1, _count(arrays, r"block(\d+)/"))
        ]
        stem = ResNetV2(num_layers, width_factor=width / 64, num_channels=num_channels)
    else:
        num_channels = in_channels
    classifier = "token" if "cls" in arrays else "gap"
    num_prefix_tokens = 1 if classifier == "token" else 0
    grid = _grid_side(label, _shape(label, arrays, POSEMB)[1] - num_prefix_tokens, POSEMB)
    block = "Transformer/encoderblock_0/"
    return VisionTransformer(
        image_size=image_size or grid * patch_h * (stem.stride if stem else 1),
        patch_size=patch_h,
        num_classes=_file_num_classes(arrays) if num_classes is None else num_classes,
        hidden_size=hidden_size,
        num_layers=_count(arrays, r"Transformer/encoderblock_(\d+)/"),
        num_heads=_shape(label, arrays, f"{block}MultiHeadDotProductAttention_1/query/kernel")[1],
        mlp_dim=_shape(label, arrays, f"{block}MlpBlock_3/Dense_0/kernel")[1],
        num_channels=num_channels,
        classifier=classifier,
        representation_size=arrays[PRE_LOGITS[0]].shape[1] if PRE_LOGITS[0] in arrays else None,
        stem=stem,
        pos_embed="learned",
    )


def _build_mixer(
    label: str, arrays: dict[str, torch.Tensor], num_classes: int | None, image_size: int | None
) -> MlpMixer:
    patch_size, _, num_channels, hidden_dim = _shape(label, arrays, "stem/kernel")
    num_tokens, tokens_mlp_dim = _shape(label, arrays, "MixerBlock_0/token_mixing/Dense_0/kernel")
    file_image_size = _grid_side(label, num_tokens, "MixerBlock_0/token_mixing") * patch_size
    if image_size not in (None, file_image_size):
        raise CheckpointError(
            f"{label} is a Mixer for {file_image_size}x{file_image_size} images; its token-mixing MLPs "
            f"are {num_tokens} tokens wide and cannot take image_size={image_size}. Use {file_image_size}."
        )
    return MlpMixer(
        image_size=file_image_size,
        patch_size=patch_size,
        num_classes=_file_num_classes(arrays) if num_classes is None else num_classes,
        hidden_dim=hidden_dim,
        num_blocks=_count(arrays, r"MixerBlock_(\d+)/"),
        tokens_mlp_dim=tokens_mlp_dim,
        channels_mlp_dim=_shape(label, arrays, "MixerBlock_0/channel_mixing/Dense_0/kernel")[1],
        num_channels=num_channels,
    )


def _file_num_classes(arrays: dict[str, torch.Tensor]) -> int:
    return arrays[HEAD[0]].shape[1] if HEAD[0] in arrays else 0


def from_official_npz(
    source: Source, *, num_classes: int | None = None, image_size: int | None = None
) -> nn.Module:
    """Build the ViT, hybrid or Mixer an official checkpoint holds and load it.

    The architecture comes from the file alone: widths, depth, heads and patch size
    from the kernel shapes, `token` pooling if it has `cls` (else `gap`), always the
    learned position embedding, pre-logits if it has `pre_logits/*`, ResNet units per
    stage from `block*/unit*`, and the image size from the position table's grid (or,
    for a Mixer, the token-mixing width). `num_classes=None` keeps the file's head; another count gets a fresh
    zero head. `image_size` other than the file's resizes the position table
    (ViT and hybrids only). The model takes NCHW float in [-1, 1] and is returned
    in eval mode.
    """
    label, arrays = _read(source)
    build = _build_mixer if "stem/kernel" in arrays else _build_vit
    model = build(label, arrays, num_classes, image_size)
    _load(model, label, arrays)
    return model.eval()
