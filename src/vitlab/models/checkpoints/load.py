"""Loading a checkpoint file into a built model, as the original fine-tunes.

Follows `vit_jax/checkpoint.py:load_pretrained`: a head of another size stays
freshly zero-initialised, a file's pre-logits are dropped (with its head) when the
model has none, and the learned position table is resized to the model's patch
grid. A file of another patch size than the model's is fitted as FlexiViT does: the
kernel PI-resized, the table resized by the flexi model's resize (`resample.py`).
The file is then compared with the model key by key and shape by shape, and only
when everything fits is anything copied.

Two layouts go through these same steps (`Layout`): the official `.npz` files
(`layout.py`) and timm's `.pth` / `.safetensors` state dicts (`timm.py`); the file's
suffix picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vitlab.errors import CheckpointError
from vitlab.models.checkpoints.layout import (
    HEAD,
    POSEMB,
    PRE_LOGITS,
    _Link,
    official_links,
    official_tensors,
)
from vitlab.models.checkpoints.npz import Source, read_official
from vitlab.models.checkpoints.resample import resample_kernel, resample_posemb
from vitlab.models.checkpoints.timm import (
    TIMM_HEAD,
    TIMM_POS_EMBED,
    is_timm_file,
    read_timm,
    timm_links,
    to_timm,
)

MAX_LISTED = 12
PATCH_KERNEL = "patch_embed.proj.weight"


@dataclass(frozen=True)
class Layout:
    """A file layout: how a model's parameters are named in such files, and which are special.

    Attributes:
        links: the model's parameters tied to the file's names (`_Link.official`).
        tensors: the model's parameters under the file's names and in its layouts.
        head: the names of the head's weight and bias (kept fresh when their sizes differ).
        pre_logits: the names of the pre-logits' weight and bias; () if the layout has none.
        posemb: the name of the learned position table (resized to the model's grid).
        builder: how to build the architecture a file holds, for messages.
    """

    links: Callable[[nn.Module], list[_Link]]
    tensors: Callable[[nn.Module], dict[str, torch.Tensor]]
    head: tuple[str, ...]
    pre_logits: tuple[str, ...]
    posemb: str
    builder: str


OFFICIAL = Layout(
    official_links,
    official_tensors,
    HEAD,
    PRE_LOGITS,
    POSEMB,
    "`vitlab.models.from_official_npz(path)`",
)
TIMM = Layout(
    timm_links,
    to_timm,
    TIMM_HEAD,
    (),
    TIMM_POS_EMBED,
    "`vitlab.models.from_timm(path, name=...)`",
)


def load_pretrained(model: nn.Module, source: Source) -> None:
    """Copy an official or timm checkpoint into an already built model, in place.

    `source` is a path to an official `.npz` or a timm `.pth` / `.pt` /
    `.safetensors` file (the suffix decides), or a mapping name -> array in the
    official layout. The model's architecture must match the file's; a head of
    another size (fine-tuning on a new dataset) stays the model's fresh zero head,
    a different patch grid gets the file's position table resized, and a different
    patch size the file's kernel PI-resized (FlexiViT, `resample.py`). Anything
    else that differs raises `CheckpointError` listing the keys and shapes, before
    the model is touched. The weights only: the model computes as its own
    configuration says (a timm file into a `gelu_approximate=tanh` model keeps tanh).
    """
    if is_timm_file(source):
        copy_into(model, *read_timm(source), layout=TIMM)
    else:
        copy_into(model, *read_official(source))


def copy_into(
    model: nn.Module, label: str, arrays: dict[str, torch.Tensor], layout: Layout = OFFICIAL
) -> None:
    """Fit the file's `arrays` (named as `layout` names them) to `model`, check them, then load them."""
    own = layout.tensors(model)
    arrays = fit_for_fine_tuning(model, arrays, own, layout)
    raise_unless_fits(label, arrays, own, layout)
    state = model.state_dict()
    model.load_state_dict(
        {
            link.ours: link.to_ours([arrays[name] for name in link.official]).to(
                state[link.ours].dtype
            )
            for link in layout.links(model)
        }
    )


def fit_for_fine_tuning(
    model: nn.Module,
    arrays: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor],
    layout: Layout = OFFICIAL,
) -> dict[str, torch.Tensor]:
    """The file's arrays made to fit a fine-tuning model, as the original's `load_pretrained` does.

    `own` is the model's own tensors in the file's layout: its zero head replaces
    the file's when the sizes differ, its grid decides the position table's, and its
    patch size the kernel's (then the table follows FlexiViT's resize).
    """
    arrays = dict(arrays)
    head, pre_logits, posemb = layout.head, layout.pre_logits, layout.posemb
    other_patch_size = False
    for link in layout.links(model):
        name = link.official[0]
        if link.ours == PATCH_KERNEL and _differs(name, arrays, own):
            arrays[name] = resample_kernel(link, arrays[name], own[name])
            other_patch_size = arrays[name].shape == own[name].shape
    drop_head = False
    if pre_logits and pre_logits[0] in arrays and pre_logits[0] not in own:
        for name in pre_logits:  # the original's "drop-head variant"
            arrays.pop(name, None)
        drop_head = True
    if drop_head or any(
        name not in arrays or name not in own or arrays[name].shape != own[name].shape
        for name in head
    ):
        for name in head:  # a new task: keep the model's own (zero) head
            arrays.pop(name, None)
            if name in own:
                arrays[name] = own[name]
    if _differs(posemb, arrays, own):
        arrays[posemb] = resample_posemb(model, arrays[posemb], own[posemb], other_patch_size)
    return arrays


def _differs(name: str, arrays: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> bool:
    """The file and the model both have `name`, in different shapes."""
    return name in arrays and name in own and arrays[name].shape != own[name].shape


def raise_unless_fits(
    label: str,
    arrays: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor],
    layout: Layout = OFFICIAL,
) -> None:
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
            report += [f"  {title} ({len(lines)}):", *(f"    {line}" for line in first_few(lines))]
    report.append(f"  ({layout.builder} builds the architecture a file holds)")
    raise CheckpointError("\n".join(report))


def first_few(lines: list[str]) -> list[str]:
    """At most `MAX_LISTED` of `lines`, then how many more there are: for error messages."""
    if len(lines) > MAX_LISTED:
        return [*lines[:MAX_LISTED], f"... and {len(lines) - MAX_LISTED} more"]
    return lines
