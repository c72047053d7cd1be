"""Optimizer parameter groups and the learning-rate schedules of the original.

With layer-wise learning-rate decay each group carries its own rate (`param_groups`).
Schedules are multiplicative factors on the base learning rate, stepped once
per optimizer step (not per epoch), as in `vit_jax/utils.py`:
linear warmup from 0, then cosine or linear decay to 0 at `total_steps`.
They are `LambdaLR`s, so their state is a step count and resumes exactly.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from vitlab.bounds import NonNegativeInt
from vitlab.errors import ConfigError


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    lr: float | None = None,
) -> list[dict]:
    """Split parameters into a decayed and a non-decayed group; with `layer_decay`, per layer too.

    Biases, normalisation parameters (every tensor with ndim <= 1) and the names a
    module lists in `no_weight_decay()` (position embedding, class token) are not
    decayed: decaying them hurts ViT training and the original AugReg recipe skips them.

    `layer_decay` (BEiT's and MAE's fine-tuning recipe): one decayed and one non-decayed
    group per layer of `layer_ids`, named `layer<id>_decay` / `layer<id>_no_decay`, each
    with its own `lr` = `lr * layer_decay ** (depth + 1 - id)`: the head trains at `lr`,
    the embeddings at the smallest rate. The rate is the group's own, so every torch
    scheduler (a `LambdaLR` multiplies each group's initial rate) keeps the ratios.
    None: the two groups alone, without names or rates of their own.
    """
    skip = set()
    for prefix, module in _named_modules_with_no_decay(model):
        skip |= {f"{prefix}{name}" for name in module.no_weight_decay()}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def decayed(name: str, param: nn.Parameter) -> bool:
        return param.ndim > 1 and name not in skip

    if layer_decay is None:
        return [
            {"params": [p for n, p in trainable if decayed(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in trainable if not decayed(n, p)], "weight_decay": 0.0},
        ]
    check_layer_decay(model, layer_decay)
    if lr is None:
        raise TypeError(
            "param_groups needs the base `lr` with `layer_decay`: the groups carry their own"
        )
    layer_of = layer_ids(model)
    top = len(_blocks(model)) + 1  # the head's layer, which keeps `lr`
    split: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in trainable:
        split.setdefault((layer_of[name], decayed(name, param)), []).append(param)
    return [
        {
            "name": f"layer{layer:0{len(str(top))}d}_{'decay' if is_decayed else 'no_decay'}",
            "params": params,
            "weight_decay": weight_decay if is_decayed else 0.0,
            "lr": lr * layer_decay ** (top - layer),
        }
        for (layer, is_decayed), params in sorted(
            split.items(), key=lambda g: (g[0][0], not g[0][1])
        )
    ]


def check_layer_decay(model: nn.Module, layer_decay: float) -> None:
    """Refuse a `layer_decay` outside (0, 1], or a backbone without `blocks` to number.

    Called when the classifier is built, so a bad value fails before training starts.
    """
    if not (_is_number(layer_decay) and 0 < layer_decay <= 1):
        raise ConfigError(
            f"optimizer.layer_decay={layer_decay!r} is not valid: use a number in (0, 1], "
            "e.g. 0.75, or null for one learning rate"
        )
    layer_ids(model)


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Each parameter's layer, by name, as BEiT and MAE number them for layer-wise decay.

    0: everything before the first block (stem, patch embedding, class token, position
    embedding); i + 1: block i; depth + 1: everything after the last block (final norm,
    pre-logits, head). Read from the model's `blocks` (`_blocks`): the model's own
    parameters (the class token) and the submodules registered before `blocks` are
    layer 0, those registered after it the last layer.
    """
    blocks = _blocks(model)
    ids = {name: 0 for name, _ in model.named_parameters(recurse=False)}
    layer = 0  # before the blocks
    for child_name, child in model.named_children():
        if child is blocks:
            for index, block in enumerate(blocks):
                ids |= {f"{child_name}.{index}.{n}": index + 1 for n, _ in block.named_parameters()}
            layer = len(blocks) + 1  # after them
        else:
            ids |= {f"{child_name}.{n}": layer for n, _ in child.named_parameters()}
    return ids


def _blocks(model: nn.Module) -> nn.Module:
    """The model's `blocks` child, in order: an `nn.ModuleList` in every vitlab backbone,
    an `nn.Sequential` in timm's (which the benchmark races)."""
    blocks = dict(model.named_children()).get("blocks")
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ConfigError(
            f"optimizer.layer_decay is set, but the backbone ({type(model).__name__}) has no "
            "`blocks` to number its layers by; it works for ViT, hybrids, Mixer and gMLP, "
            "or set optimizer.layer_decay=null"
        )
    return blocks


def build_optimizer(
    factory: Callable[[list[dict]], Optimizer], model: nn.Module, layer_decay: float | None = None
) -> Optimizer:
    """`factory(param_groups(model, weight_decay, layer_decay, lr))`, the rates read from the factory.

    `factory` is what Hydra makes of an `optimizer` node (`_partial_: true`): a
    `functools.partial` whose `weight_decay` keyword, if any, goes to the decayed groups
    and whose `lr` (bound, or the optimizer's default) is the head's with `layer_decay`.
    """
    weight_decay = getattr(factory, "keywords", {}).get("weight_decay", 0.0)
    if layer_decay is None:
        return factory(param_groups(model, weight_decay))
    lr = inspect.signature(factory).parameters["lr"].default
    return factory(param_groups(model, weight_decay, layer_decay, lr))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _named_modules_with_no_decay(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            yield (f"{name}." if name else ""), module


def _warmup_within(warmup_steps: int, total_steps: int) -> int:
    """`warmup_steps`, cut to `total_steps` (with one warning naming both) when the run is shorter.

    A shorter run is the first change a user makes (`trainer.max_epochs=1`): it must
    train with the default warmup rather than fail. A negative warmup is refused.
    """
    if warmup_steps < 0:
        raise ConfigError(f"scheduler.warmup_steps={warmup_steps} must be >= 0")
    if warmup_steps > total_steps:
        rank_zero_warn(
            f"scheduler.warmup_steps={warmup_steps} is more than the {total_steps} optimizer "
            f"steps of this run: warming up for all {total_steps} steps instead"
        )
        return total_steps
    return warmup_steps


def _warmup_then(
    decay: Callable[[float], float], warmup_steps: int, total_steps: int
) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return decay(min(1.0, progress))

    return factor


def warmup_cosine(
    optimizer: Optimizer, *, total_steps: int, warmup_steps: NonNegativeInt = 0
) -> LambdaLR:
    """Linear warmup for `warmup_steps`, then half-cosine decay to 0 at `total_steps`."""
    warmup_steps = _warmup_within(warmup_steps, total_steps)
    return LambdaLR(
        optimizer,
        _warmup_then(lambda p: 0.5 * (1.0 + math.cos(math.pi * p)), warmup_steps, total_steps),
    )


def warmup_linear(
    optimizer: Optimizer, *, total_steps: int, warmup_steps: NonNegativeInt = 0
) -> LambdaLR:
    """Linear warmup for `warmup_steps`, then linear decay to 0 at `total_steps`."""
    warmup_steps = _warmup_within(warmup_steps, total_steps)
    return LambdaLR(optimizer, _warmup_then(lambda p: 1.0 - p, warmup_steps, total_steps))


def constant(
    optimizer: Optimizer, *, total_steps: int, warmup_steps: NonNegativeInt = 0
) -> LambdaLR:
    """Linear warmup for `warmup_steps`, then the base learning rate unchanged."""
    warmup_steps = _warmup_within(warmup_steps, total_steps)
    return LambdaLR(optimizer, _warmup_then(lambda p: 1.0, warmup_steps, total_steps))
