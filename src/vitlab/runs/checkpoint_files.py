"""What a `ckpt_path=` file must be, checked before anything is built.

`src/train.py ckpt_path=...` continues training from a whole Lightning training
checkpoint; `src/eval.py ckpt_path=...` rebuilds its model from the run config saved in
one. A missing, truncated or foreign file is refused by name, with what to use instead,
rather than failing deep inside Lightning's loading.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vitlab.errors import ConfigError

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


def check_training_checkpoint(ckpt_path: str) -> None:
    """Refuse a file that is not a whole Lightning training checkpoint, naming it.

    Memory-mapped, so even a large checkpoint is checked without reading its tensors.
    """
    path = existing_checkpoint(ckpt_path)
    try:
        keys = set(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception as err:
        raise ConfigError(
            f"ckpt_path={ckpt_path} is not a readable checkpoint ({type(err).__name__}: {err})"
        ) from err
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
    }
)


def check_model_matches(ckpt_path: str, model: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose model differs from the configured one in a key its weights depend on.

    Lightning would fail on the first mismatched tensor, deep in `load_state_dict`;
    this names every key that differs, with both values.
    """
    saved = run_config_of(ckpt_path).get("model") or {}
    keys = (set(saved) | set(model)) - RUN_KNOBS
    differ = sorted(k for k in keys if saved.get(k) != model.get(k))
    if differ:
        theirs = ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
        ours = ", ".join(f"model.{k}={model.get(k)!r}" for k in differ)
        raise ConfigError(
            f"ckpt_path={ckpt_path} holds a model with {theirs}, but this run's has {ours}; "
            "use the model the checkpoint was trained with (leave model= out for src/eval.py)"
        )


def run_config_of(ckpt_path: str) -> dict[str, Any]:
    """The resolved run config that `src/train.py` saved in the checkpoint's hyperparameters."""
    path = existing_checkpoint(ckpt_path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ConfigError(
            f"ckpt_path={ckpt_path} is not a readable Lightning checkpoint ({type(err).__name__}: {err})"
        ) from err
    config = checkpoint.get("hyper_parameters", {}).get("config")
    if not config:
        raise ConfigError(
            f"ckpt_path={ckpt_path} holds no vitlab run config; was it written by `src/train.py`?"
        )
    return config
