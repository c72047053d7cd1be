"""What a `ckpt_path=` file must be, checked before anything is built.

`src/train.py ckpt_path=...` continues training from a whole Lightning training
checkpoint; `src/eval.py ckpt_path=...` rebuilds its model from the run config saved in
one. A missing, truncated or foreign file is refused by name, with what to use instead,
rather than failing deep inside Lightning's loading.
"""

from __future__ import annotations

import inspect
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vitlab.errors import ConfigError
from vitlab.training.ema import ema_state_dict

TRAINING_CHECKPOINT_KEYS = frozenset({"state_dict", "global_step", "loops", "optimizer_states"})


def existing_checkpoint(ckpt_path: str) -> Path:
    """The checkpoint file, after a cheap check that it exists and is a whole torch zip archive."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path} does not exist; give a .ckpt file from a run's checkpoints/ folder"
        )
    if not zipfile.is_zipfile(path):
        raise ConfigError(
            f"ckpt_path={ckpt_path} is not a PyTorch checkpoint (truncated, corrupt or another "
            "format); use another file of the run's checkpoints/ folder, e.g. an epoch_*.ckpt"
        )
    return path


def mapped_checkpoint(ckpt_path: str) -> dict[str, Any]:
    """The checkpoint, memory-mapped: its keys and small values are read, its tensors only
    when used, so the checks below cost little even for a large file."""
    path = existing_checkpoint(ckpt_path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ConfigError(
            f"ckpt_path={ckpt_path} is not a readable Lightning checkpoint ({type(err).__name__}: {err})"
        ) from err


def check_ema_weights(ckpt_path: str) -> None:
    """Refuse `ema=true` for a checkpoint trained without EMA, naming it, before anything is built."""
    ema_state_dict(mapped_checkpoint(ckpt_path), f"ckpt_path={ckpt_path}")


def check_training_checkpoint(ckpt_path: str) -> None:
    """Refuse a file that is not a whole Lightning training checkpoint, naming it.

    Memory-mapped, so even a large checkpoint is checked without reading its tensors.
    """
    keys = set(mapped_checkpoint(ckpt_path))
    missing = TRAINING_CHECKPOINT_KEYS - keys
    if missing:
        raise ConfigError(
            f"ckpt_path={ckpt_path} is not a Lightning training checkpoint: it lacks "
            f"{sorted(missing)} (it has {sorted(keys)}); pretrained weights go in model.pretrained="
        )


# Model keys that change how the model runs, not its weights: a resumed or evaluated
# checkpoint may differ in them.
RUN_KNOBS = frozenset(
    {
        "pretrained",
        "grad_checkpointing",
        "attention_backend",
        "channels_last",
        "dropout_rate",
        "attention_dropout_rate",
        "drop_path_rate",
        # Dynamic patches: how a ViT trains or runs, on the same parameters.
        "flexi_patch_sizes",
        "token_merging",
        "patch_dropout",
    }
)


def check_model_matches(ckpt_path: str, model: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose model differs from the configured one in a key its weights depend on.

    Lightning would fail on the first mismatched tensor, deep in `load_state_dict`;
    this names every key that differs, with both values. A key that an older run's
    config lacks (it was added since) counts as the constructor's default.
    """
    saved = _as_current(run_config_of(ckpt_path).get("model") or {})
    model = _as_current(model)
    keys = (set(saved) | set(model)) - RUN_KNOBS
    if _value(saved, "stem") != "resnet" and _value(model, "stem") != "resnet":
        keys -= {"resnet_layers", "resnet_width_factor"}  # read for stem=resnet only
    differ = sorted(k for k in keys if _value(saved, k) != _value(model, k))
    if differ:
        theirs = ", ".join(f"{k}={_value(saved, k)!r}" for k in differ)
        ours = ", ".join(f"model.{k}={_value(model, k)!r}" for k in differ)
        raise ConfigError(
            f"ckpt_path={ckpt_path} holds a model with {theirs}, but this run's has {ours}; "
            "use the model the checkpoint was trained with (leave model= out for src/eval.py)"
        )


def _as_current(model: Mapping[str, Any]) -> dict[str, Any]:
    """A model config in today's keys: an old hybrid's `stem: {_target_: ...ResNetV2, ...}` node
    is `stem: resnet` with `resnet_layers` / `resnet_width_factor`."""
    model = dict(model)
    stem = model.get("stem")
    if isinstance(stem, Mapping) and str(stem.get("_target_", "")).endswith("ResNetV2"):
        model["stem"] = "resnet"
        model["resnet_layers"] = list(stem.get("num_layers", []))
        model["resnet_width_factor"] = stem.get("width_factor", 1.0)
    return model


def _value(model: Mapping[str, Any], key: str) -> Any:
    """`model[key]`, or the default of the model class's constructor when the config lacks it
    (sequences as lists, as a config holds them)."""
    if key in model:
        value = model[key]
        return list(value) if isinstance(value, tuple) else value
    import hydra.utils

    try:
        parameter = inspect.signature(hydra.utils.get_object(str(model["_target_"]))).parameters[
            key
        ]
    except Exception:  # no such class or argument: the key is simply absent
        return None
    default = None if parameter.default is parameter.empty else parameter.default
    return list(default) if isinstance(default, tuple) else default


def run_config_of(ckpt_path: str) -> dict[str, Any]:
    """The resolved run config that `src/train.py` saved in the checkpoint's hyperparameters."""
    config = mapped_checkpoint(ckpt_path).get("hyper_parameters", {}).get("config")
    if not config:
        raise ConfigError(
            f"ckpt_path={ckpt_path} holds no vitlab run config; was it written by `src/train.py`?"
        )
    return config
