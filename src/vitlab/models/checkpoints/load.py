"""Loading an official checkpoint into a built model, as the original fine-tunes.

Follows `vit_jax/checkpoint.py:load_pretrained`: a head of another size stays
freshly zero-initialised, a file's pre-logits are dropped (with its head) when the
model has none, and the learned position table is resized to the model's patch
grid. The file is then compared with the model key by key and shape by shape,
and only when everything fits is anything copied.
"""

from __future__ import annotations

import torch
from torch import nn

from vitlab.errors import CheckpointError
from vitlab.models.checkpoints.layout import (
    HEAD,
    POSEMB,
    PRE_LOGITS,
    official_links,
    official_tensors,
)
from vitlab.models.checkpoints.npz import Source, read_official
from vitlab.models.checkpoints.resample import resample_posemb

MAX_LISTED = 12


def load_pretrained(model: nn.Module, source: Source) -> None:
    """Copy an official checkpoint into an already built ViT, hybrid or Mixer, in place.

    `source` is a path to an `.npz` or a mapping name -> array. The model's
    architecture must match the file's; a head of another size (fine-tuning on a
    new dataset) stays the model's fresh zero head, and a different patch grid gets
    the file's position table resized. Anything else that differs raises
    `CheckpointError` listing the keys and shapes, before the model is touched.
    """
    copy_into(model, *read_official(source))


def copy_into(model: nn.Module, label: str, arrays: dict[str, torch.Tensor]) -> None:
    """Fit the file's `arrays` to `model` for fine-tuning, check them, then load them."""
    own = official_tensors(model)
    arrays = fit_for_fine_tuning(model, arrays, own)
    raise_unless_fits(label, arrays, own)
    state = model.state_dict()
    model.load_state_dict(
        {
            link.ours: link.to_ours([arrays[name] for name in link.official]).to(
                state[link.ours].dtype
            )
            for link in official_links(model)
        }
    )


def fit_for_fine_tuning(
    model: nn.Module, arrays: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The file's arrays made to fit a fine-tuning model, as the original's `load_pretrained` does.

    `own` is the model's own official tensors: its zero head replaces the file's
    when the sizes differ, and its grid decides the position table's.
    """
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
        arrays[POSEMB] = resample_posemb(model, arrays[POSEMB], own[POSEMB])
    return arrays


def raise_unless_fits(
    label: str, arrays: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
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
    report.append(
        "  (`vitlab.models.from_official_npz(path)` builds the architecture a file holds)"
    )
    raise CheckpointError("\n".join(report))


def first_few(lines: list[str]) -> list[str]:
    """At most `MAX_LISTED` of `lines`, then how many more there are: for error messages."""
    if len(lines) > MAX_LISTED:
        return [*lines[:MAX_LISTED], f"... and {len(lines) - MAX_LISTED} more"]
    return lines
