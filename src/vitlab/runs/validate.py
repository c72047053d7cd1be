"""Config checks that no object owns, run before anything is built.

Most values are checked where they are used (the model checks its patch size, the
data module its batch, the schedule its warmup). What is left here: combinations
only the whole run config can judge (a precision the accelerator cannot run), and
values whose owners, torch's optimizers and Lightning's Trainer, would refuse late
or obscurely (a non-positive learning rate, `max_steps=0`), and keys that were renamed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vitlab.errors import ConfigError, exit_with

GPU_ACCELERATORS = ("gpu", "cuda")
# Lightning also takes 16-true / bf16-true / 64-true; these three are the sweep axis.
CPU_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "64-true")
# The SDPA kernels PyTorch has on the CPU (`model.attention_backend`).
CPU_ATTENTION_BACKENDS = (None, "auto", "math", "flash")
# Config keys that were renamed, old -> new: setting an old one fails, naming the new one.
RENAMED_KEYS = {"classifier.label_smoothing": "loss.label_smoothing"}


def runs_on_cpu(trainer: Mapping[str, Any], gpu_available: bool | None = None) -> bool:
    """Whether a trainer config runs on the CPU: `accelerator: cpu`, or `auto` with no CUDA GPU."""
    import torch  # here, not with the module: vitlab.reports reads is_number and loads no torch

    gpu_available = torch.cuda.is_available() if gpu_available is None else gpu_available
    accelerator = str(trainer.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not gpu_available)


def check_trainer(trainer: Mapping[str, Any], gpu_available: bool | None = None) -> None:
    """Refuse a GPU trainer without a GPU, and a precision the accelerator cannot run.

    Lightning would accept `precision=16-mixed` on the CPU and run something other
    than what the user asked for; we say so instead of running it silently.
    """
    import torch

    gpu_available = torch.cuda.is_available() if gpu_available is None else gpu_available
    accelerator = str(trainer.get("accelerator", "auto"))
    precision = str(trainer.get("precision", "32-true"))
    if accelerator in GPU_ACCELERATORS and not gpu_available:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no CUDA GPU; "
            "use trainer=cpu (or trainer.accelerator=cpu), or trainer=default to pick the GPU when there is one"
        )
    on_cpu = runs_on_cpu(trainer, gpu_available)
    if on_cpu and precision not in CPU_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision} needs a CUDA GPU (float16 autocast with loss scaling), "
            f"but this run is on the CPU; valid on the CPU: {', '.join(CPU_PRECISIONS)}"
        )
    if (
        not on_cpu
        and gpu_available
        and precision.startswith("bf16")
        and not torch.cuda.is_bf16_supported()
    ):
        raise ConfigError(
            f"trainer.precision={precision} needs a GPU with bfloat16 (Ampere or newer); "
            "use trainer.precision=16-mixed or 32-true on this GPU"
        )


def _require(condition: bool, key: str, value: Any, valid: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is not valid; {valid}")


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_renamed_keys(keys: Iterable[str]) -> None:
    """Refuse dotted keys that were renamed (or a node above one: `classifier={...}`), naming the new key."""
    for key in keys:
        for old, new in RENAMED_KEYS.items():
            if key == old or old.startswith(f"{key}."):
                raise ConfigError(f"{old} was renamed to {new}; set {new} instead")


def refuse_renamed_overrides(argv: Sequence[str]) -> None:
    """Exit with status 2 if a command-line override sets a renamed key, naming the new one.

    For the entry points, before `hydra.main`: Hydra would refuse the old key only as
    one it does not know (`Could not override ...`), without the new name.
    """
    keys = [
        arg.split("=", 1)[0].lstrip("+~") for arg in argv if "=" in arg and not arg.startswith("-")
    ]
    try:
        check_renamed_keys(keys)
    except ConfigError as err:
        exit_with(err)


def _has_key(cfg: Mapping[str, Any], dotted: str) -> bool:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def check_run(cfg: Mapping[str, Any]) -> None:
    """Refuse values whose owners (torch's optimizers, Lightning's Trainer) would fail late or obscurely.

    Each message names the key, the value and what would be valid. The model, the
    data, the classifier and the schedule check their own fields when they are built.
    A renamed key (from a config file of the user's, or `+old.key=...`) is refused too:
    nothing would read it.
    """
    check_renamed_keys(old for old in RENAMED_KEYS if _has_key(cfg, old))
    optimizer = cfg.get("optimizer") or {}
    lr = optimizer.get("lr", 1.0)
    _require(is_number(lr) and lr > 0, "optimizer.lr", lr, "use a positive number, e.g. 1e-3")
    weight_decay = optimizer.get("weight_decay", 0.0)
    _require(
        is_number(weight_decay) and weight_decay >= 0,
        "optimizer.weight_decay",
        weight_decay,
        "use a number >= 0",
    )
    trainer = cfg.get("trainer") or {}
    backend = (cfg.get("model") or {}).get("attention_backend")
    on_cpu = runs_on_cpu(trainer)
    _require(
        not on_cpu or backend in CPU_ATTENTION_BACKENDS,
        "model.attention_backend",
        backend,
        "this run is on the CPU, which has only the auto, math and flash kernels",
    )
    for key in ("max_steps", "max_epochs"):
        value = trainer.get(key, -1)
        _require(
            value is None or value == -1 or (is_number(value) and value > 0),
            f"trainer.{key}",
            value,
            "use a positive number, or -1 for no limit",
        )
