"""Optimizer parameter groups and the learning-rate schedules of the original.

Schedules are multiplicative factors on the base learning rate, stepped once
per optimizer step (not per epoch), as in `vit_jax/utils.py`:
linear warmup from 0, then cosine or linear decay to 0 at `total_steps`.
They are `LambdaLR`s, so their state is a step count and resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from vitlab.bounds import NonNegativeInt
from vitlab.errors import ConfigError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed and a non-decayed group.

    Biases, normalisation parameters (every tensor with ndim <= 1) and the names a
    module lists in `no_weight_decay()` (position embedding, class token) are not
    decayed: decaying them hurts ViT training and the original AugReg recipe skips them.
    """
    skip = set()
    for prefix, module in _named_modules_with_no_decay(model):
        skip |= {f"{prefix}{name}" for name in module.no_weight_decay()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_skipped = param.ndim <= 1 or name in skip
        (no_decay if is_skipped else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(factory: Callable[[list[dict]], Optimizer], model: nn.Module) -> Optimizer:
    """`factory(param_groups(model, weight_decay))`, the weight decay read from the factory.

    `factory` is what Hydra makes of an `optimizer` node (`_partial_: true`): a
    `functools.partial` whose `weight_decay` keyword, if any, goes to the decayed group.
    """
    weight_decay = getattr(factory, "keywords", {}).get("weight_decay", 0.0)
    return factory(param_groups(model, weight_decay))


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
