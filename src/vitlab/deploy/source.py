"""`load_source`: the model a file holds, with its preprocessing and class names, from any file vitlab reads.

A deployment starts from one of three files: a vitlab run checkpoint (`.ckpt`, which
holds its run config, so the model, the data and the class names come with it), an
official `.npz` (`from_official_npz`) or a timm `.pth` / `.pt` / `.safetensors`
(`from_timm`). Each becomes the same `ModelSource`, so export and prediction never
ask which it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import OmegaConf
from torch import nn

from vitlab.deploy.labels import data_config_names
from vitlab.deploy.preprocess import Preprocess
from vitlab.errors import CheckpointError, ConfigError
from vitlab.models import from_official_npz, from_timm
from vitlab.models.checkpoints.timm import TIMM_SUFFIXES
from vitlab.runs.build import build_backbone
from vitlab.training.ema import ema_state_dict

SourceKind = Literal["checkpoint", "official", "timm"]
CHECKPOINT_SUFFIX = ".ckpt"
OFFICIAL_SUFFIX = ".npz"
ACCEPTED = (
    f"a vitlab run checkpoint ({CHECKPOINT_SUFFIX}), an official {OFFICIAL_SUFFIX} "
    f"or a timm {' / '.join(TIMM_SUFFIXES)} file"
)
BACKBONE_PREFIX = "backbone."  # `ImageClassifier.backbone`'s keys in a run checkpoint


@dataclass(frozen=True)
class ModelSource:
    """A model ready to deploy, and what it must be fed and what its outputs mean.

    Attributes:
        model: the backbone alone (NCHW float in [-1, 1] -> logits), in eval mode.
        preprocess: its evaluation transform.
        class_names: the names the checkpoint gives its classes, or None
            (`vitlab.deploy.labels.class_names_for` falls back to others).
        data_config: the run's resolved data config, or None for an official or timm file.
        label: the file, for messages.
        kind: which of the three files it came from.
    """

    model: nn.Module
    preprocess: Preprocess
    class_names: list[str] | None
    data_config: dict[str, Any] | None
    label: str
    kind: SourceKind


def load_source(
    path: str | Path, *, key: str = "model_path", timm_name: str | None = None, ema: bool = False
) -> ModelSource:
    """Read the model `path` holds; the suffix decides how.

    `key` is the config key that named the file, used in messages. `timm_name` (a
    timm model name, e.g. "vit_small_patch16_224") is needed for a timm ViT only,
    whose head count no weight shape tells. `ema` takes a run checkpoint's EMA weights
    (`vitlab.training.ema`) instead of its trained ones; a checkpoint without them, or
    another file, raises a `ConfigError`. A missing file, an unknown suffix or an
    unreadable file raises a `CheckpointError` naming `key`, the path and what is accepted.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if not path.is_file():
        raise CheckpointError(f"{key}={path} does not exist or is not a file; give {ACCEPTED}")
    if suffix == CHECKPOINT_SUFFIX:
        return _from_run_checkpoint(path, key, ema)
    if ema and suffix in (OFFICIAL_SUFFIX, *TIMM_SUFFIXES):
        raise ConfigError(
            f"ema=true takes the EMA weights a run checkpoint ({CHECKPOINT_SUFFIX}) keeps, but "
            f"{key}={path} is an official or timm file, with one set of weights; leave ema=false"
        )
    if suffix == OFFICIAL_SUFFIX:
        model = from_official_npz(path)
        return ModelSource(model, Preprocess.for_model(model), None, None, str(path), "official")
    if suffix in TIMM_SUFFIXES:
        try:
            model = from_timm(path, name=timm_name)
        except CheckpointError as err:
            if timm_name is None:
                err.add_note(
                    "Name the timm model with timm_name=<name>, e.g. vit_small_patch16_224."
                )
            raise
        return ModelSource(model, Preprocess.for_model(model), None, None, str(path), "timm")
    raise CheckpointError(f"{key}={path} has the suffix {suffix or '(none)'!r}; give {ACCEPTED}")


def _from_run_checkpoint(path: Path, key: str, ema: bool) -> ModelSource:
    """The backbone of a `src/train.py` checkpoint, rebuilt from the run config saved in it;
    its EMA weights with `ema`."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated, another format, or not a PyTorch file at all
        raise CheckpointError(
            f"{key}={path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err}); "
            f"give {ACCEPTED}"
        ) from err
    hyper_parameters = checkpoint.get("hyper_parameters") or {}
    config = hyper_parameters.get("config")
    if not config or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{key}={path} holds no vitlab run config and weights; was it written by `src/train.py`?"
        )
    model_cfg = dict(config["model"])
    model_cfg.pop("pretrained", None)  # the checkpoint's own weights replace them
    # A GPU kernel the run chose (a Mixer's or gMLP's is null); deployment runs anywhere.
    if model_cfg.get("attention_backend") is not None:
        model_cfg["attention_backend"] = "auto"
    try:
        model = build_backbone(OmegaConf.create(model_cfg))
    except ConfigError as err:
        raise CheckpointError(
            f"{key}={path}: its saved model config does not build: {err}"
        ) from err
    state_dict = ema_state_dict(checkpoint, f"{key}={path}") if ema else checkpoint["state_dict"]
    weights = {
        name.removeprefix(BACKBONE_PREFIX): tensor
        for name, tensor in state_dict.items()
        if name.startswith(BACKBONE_PREFIX)
    }
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"{key}={path}: its weights do not fit the model its config describes: {err}"
        ) from err
    data = dict(config["data"])
    names = hyper_parameters.get("class_names") or data_config_names(data)
    return ModelSource(
        model=model.eval(),
        preprocess=Preprocess.from_data_config(data),
        class_names=None if names is None else [str(n) for n in names],
        data_config=data,
        label=str(path),
        kind="checkpoint",
    )
