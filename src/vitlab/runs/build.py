"""The only place where configs become objects.

Everything built here (backbone, classifier, callbacks, loggers, trainer) is a plain
class that can also be built by hand without Hydra; this module adds what a config
cannot say by itself: a constructor's complaint becomes a `ConfigError` naming the
key, `model.pretrained` is loaded after the backbone is built, and the objects that
need to know the run get it (a W&B logger its run id and sweep, `GracefulStop` the
command line it prints for resuming).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import hydra
import lightning as L
from hydra.errors import InstantiationException
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vitlab.errors import ConfigError, VitlabError
from vitlab.models import fast
from vitlab.models.checkpoints import load_pretrained
from vitlab.runs.multirun import is_multirun, job_overrides, sweep_id
from vitlab.runs.resume import wandb_run_id
from vitlab.runs.validate import check_trainer, runs_on_cpu
from vitlab.training.checkpoint_io import AtomicCheckpointIO
from vitlab.training.classifier import ImageClassifier


def instantiate(node: Any, key: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, but a constructor's complaint becomes a `ConfigError` naming the key."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        if isinstance(cause, VitlabError):  # already names its key and value
            raise cause from None
        target = node.get("_target_", "?") if hasattr(node, "get") else "?"
        raise ConfigError(f"Bad value under `{key}` (building {target}):\n  {cause}") from err


def compile_options(value: Any) -> dict[str, Any] | None:
    """The keywords for `torch.compile` that the `compile` key asks for; None: do not compile.

    `compile: true` compiles with torch's defaults; a mapping gives the keywords
    (`compile: {mode: max-autotune}`); false or null does not compile.
    """
    if not value:
        return None
    return (
        {}
        if value is True
        else dict(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
    )


def build_backbone(model_cfg: DictConfig) -> nn.Module:
    """Build the configured backbone and, if `model.pretrained` names a file, load it."""
    node = OmegaConf.to_container(model_cfg, resolve=True)
    pretrained = node.pop("pretrained", None)
    backbone = instantiate(node, "model")
    if pretrained:
        load_pretrained(backbone, pretrained)
    return backbone


def build_optimizer_factory(node: DictConfig) -> tuple[Any, float | None]:
    """The `optimizer` node's factory (a Hydra partial) and its `optimizer.layer_decay`.

    `layer_decay` is vitlab's, not the torch optimizer's: it is taken out of the node
    before the node is built, and goes to `optim.build_optimizer` (None when unset).
    """
    node = OmegaConf.to_container(node, resolve=True)
    layer_decay = node.pop("layer_decay", None)
    return instantiate(node, "optimizer"), layer_decay


def build_classifier(
    cfg: DictConfig, with_optimizer: bool = True, class_names: Sequence[str] | None = None
) -> ImageClassifier:
    """Wrap the backbone in `ImageClassifier` with the configured optimizer, scheduler and loss.

    `class_names` (the datamodule's) are saved in the checkpoint with the hyperparameters.
    """
    if class_names is not None and len(class_names) != cfg.data.num_classes:
        raise ConfigError(
            f"data.num_classes={cfg.data.num_classes} but the data has {len(class_names)} classes; "
            f"set data.num_classes={len(class_names)} (or null for data that counts its classes)"
        )
    scheduler = cfg.get("scheduler") if with_optimizer else None
    backbone = build_backbone(cfg.model)
    options = compile_options(cfg.get("compile"))
    if options is not None:
        # Before tracing: the compiled GELU's loops cannot be compiled while it runs.
        fast.choose_compiled_gelu(options, runs_on_cpu(cfg.get("trainer") or {}))
        backbone.compile(**options)  # in place: state-dict keys stay those of the model
    optimizer, layer_decay = (
        build_optimizer_factory(cfg.optimizer) if with_optimizer else (None, None)
    )
    scheduler = instantiate(scheduler, "scheduler") if scheduler else None
    try:
        return ImageClassifier(
            backbone=backbone,
            optimizer=optimizer,
            scheduler=scheduler,
            num_classes=cfg.data.num_classes,
            label_smoothing=cfg.get("loss", {}).get("label_smoothing", 0.0),
            class_names=class_names,
            config=OmegaConf.to_container(cfg, resolve=True),
            layer_decay=layer_decay,
        )
    except ConfigError:
        raise  # names its key already (optimizer.layer_decay)
    except ValueError as err:  # the loss's own fields, e.g. label_smoothing
        raise ConfigError(f"Bad value under `loss`: {err}") from err


def build_trainer(cfg: DictConfig, **kwargs: Any) -> L.Trainer:
    """The Lightning Trainer with the configured callbacks and loggers."""
    check_trainer(cfg.trainer)
    callbacks = _instantiate_group(cfg.get("callbacks"), "callbacks", cfg)
    loggers = _instantiate_group(cfg.get("logger"), "logger", cfg)
    trainer = instantiate(
        cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False, **kwargs
    )
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the config chose
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    return trainer


def _instantiate_group(group: DictConfig | None, key: str, cfg: DictConfig) -> list[Any]:
    """Each `_target_` node of a group (callbacks, logger) -> an object, in config order."""
    if not group:
        return []
    return [
        instantiate(node, f"{key}.{name}", **_run_fields(node, cfg))
        for name, node in group.items()
        if node and "_target_" in node
    ]


def _run_fields(node: DictConfig, cfg: DictConfig) -> dict[str, Any]:
    """The constructor arguments that come from the run, not the config, for the node's class."""
    target = str(node.get("_target_", ""))
    if target.endswith("WandbLogger"):
        return _wandb_fields(node, cfg)
    if target.startswith("vitlab.") and "overrides" not in node and _takes(target, "overrides"):
        return {"overrides": job_overrides()}  # repeated in the command it prints for resuming
    return {}


def _takes(target: str, name: str) -> bool:
    """Whether the class or function `target` names has a parameter `name`."""
    return name in inspect.signature(hydra.utils.get_object(target)).parameters


def _wandb_fields(node: DictConfig, cfg: DictConfig) -> dict[str, Any]:
    """A W&B run gets the run folder's id (`<run>/wandb_id`), so a resumed run continues it.

    Inside a multirun it is also grouped by sweep, named by its overrides and tagged with them.
    """
    fields: dict[str, Any] = {
        "id": node.get("id") or wandb_run_id(cfg.paths.output_dir),
        "resume": node.get("resume") or "allow",
    }
    if is_multirun():
        overrides = job_overrides()
        group = "_".join(part for part in (cfg.get("sweep_name"), sweep_id()) if part)
        fields["group"] = node.get("group") or group
        fields["name"] = node.get("name") or ",".join(overrides) or None
        fields["tags"] = [*(node.get("tags") or []), *overrides]
    return fields
