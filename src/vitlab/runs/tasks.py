"""`train(cfg)` and `evaluate(cfg)`: the only place where configs become objects.

The entry points in `src/` compose a config with Hydra and call one of these.
Everything they build (backbone, classifier, datamodule, callbacks, loggers,
trainer) is a plain class that can also be built by hand without Hydra.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from vitlab.training.allocator import retain_freed_memory
from vitlab.training.checkpoint_io import AtomicCheckpointIO
from vitlab.runs.validate import check_run, check_trainer
from vitlab.training.classifier import ImageClassifier
from vitlab.runs.console import print_config_tree, print_metrics
from vitlab.errors import ConfigError, VitlabError, exit_with
from vitlab.models.checkpoints import load_pretrained
from vitlab.runs.provenance import record_provenance
from vitlab.runs.resume import config_subdir, resolve_ckpt_path, run_folder, wandb_run_id
from vitlab.training.signals import Interrupted
from vitlab.runs.multirun import is_multirun, job_overrides, record_status, sweep_id

log = logging.getLogger(__name__)

_UNIQUE_DIRS: dict[str, str] = {}


def unique_dir(path: str) -> str:
    """`path`, or `path_2`, `path_3`, ... if it exists: a new run never reuses a folder.

    Remembered per process, so every resolution of `hydra.run.dir` in one run
    agrees even after the folder has been created.
    """
    if path not in _UNIQUE_DIRS:
        candidate, n = path, 1
        while os.path.exists(candidate):
            n += 1
            candidate = f"{path}_{n}"
        _UNIQUE_DIRS[path] = candidate
    return _UNIQUE_DIRS[path]


OmegaConf.register_new_resolver("vitlab.unique", unique_dir, replace=True)
OmegaConf.register_new_resolver("vitlab.run_folder", run_folder, replace=True)
OmegaConf.register_new_resolver("vitlab.config_subdir", config_subdir, replace=True)


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


def build_backbone(model_cfg: DictConfig) -> nn.Module:
    """Build the configured backbone and, if `model.pretrained` names a file, load it."""
    node = OmegaConf.to_container(model_cfg, resolve=True)
    pretrained = node.pop("pretrained", None)
    backbone = instantiate(node, "model")
    if pretrained:
        load_pretrained(backbone, pretrained)
    return backbone


def compile_options(value: Any) -> dict[str, Any] | None:
    """The keywords for `torch.compile` that the `compile` key asks for; None: do not compile.

    `compile: true` compiles with torch's defaults; a mapping gives the keywords
    (`compile: {mode: max-autotune}`); false or null does not compile.
    """
    if not value:
        return None
    return {} if value is True else dict(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def build_classifier(cfg: DictConfig, with_optimizer: bool = True) -> ImageClassifier:
    """Wrap the backbone in `ImageClassifier` with the configured optimizer, scheduler and loss."""
    scheduler = cfg.get("scheduler") if with_optimizer else None
    backbone = build_backbone(cfg.model)
    options = compile_options(cfg.get("compile"))
    if options is not None:
        backbone.compile(**options)  # in place: state-dict keys stay those of the model
    optimizer = instantiate(cfg.optimizer, "optimizer") if with_optimizer else None
    scheduler = instantiate(scheduler, "scheduler") if scheduler else None
    try:
        return ImageClassifier(
            backbone=backbone,
            optimizer=optimizer,
            scheduler=scheduler,
            num_classes=cfg.data.num_classes,
            label_smoothing=cfg.get("classifier", {}).get("label_smoothing", 0.0),
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    except ValueError as err:  # the classifier's own fields, e.g. label_smoothing
        raise ConfigError(f"Bad value under `classifier`: {err}") from err


def _instantiate_group(group: DictConfig | None, key: str, cfg: DictConfig) -> list[Any]:
    """Each `_target_` node of a group (callbacks, logger) -> an object, in config order."""
    if not group:
        return []
    return [
        instantiate(node, f"{key}.{name}", **_wandb_fields(node, cfg))
        for name, node in group.items()
        if node and "_target_" in node
    ]


def _wandb_fields(node: DictConfig, cfg: DictConfig) -> dict[str, Any]:
    """A W&B run gets the run folder's id (`<run>/wandb_id`), so a resumed run continues it.

    Inside a multirun it is also grouped by sweep, named by its overrides and tagged with them.
    """
    if not str(node.get("_target_", "")).endswith("WandbLogger"):
        return {}
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


def prepare_run(cfg: DictConfig) -> None:
    """What every entry point does before its work: the `extras`, provenance, the seed."""
    if cfg.get("extras", {}).get("retain_freed_memory"):
        retain_freed_memory()
    if cfg.get("extras", {}).get("ignore_warnings"):
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        warnings.filterwarnings(
            "ignore", message=".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*"
        )
    if cfg.get("extras", {}).get("print_config"):
        print_config_tree(cfg)
    record_provenance(cfg.paths.output_dir)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, torch.Tensor)) and torch.as_tensor(v).numel() == 1
    }


@rank_zero_only  # DDP ranks share the folder; rank 0 writes and prints
def _finish(metrics: dict[str, float], output_dir: str) -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "metrics.json").write_text(
        json.dumps(metrics, indent=2, sort_keys=True) + "\n"
    )
    print_metrics(metrics, output_dir)


@contextmanager
def _wandb_run_closed_after() -> Iterator[None]:
    """Close the W&B run, if one is open, when the block ends: the next run (or the next
    job of a multirun) must start its own, and a failure must be marked as one."""
    failed = True
    try:
        yield
        failed = False
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)


def _existing_checkpoint(ckpt_path: str) -> Path:
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


def _training_checkpoint(ckpt_path: str) -> None:
    """Refuse a file that is not a whole Lightning training checkpoint, naming it.

    Memory-mapped, so even a large checkpoint is checked without reading its tensors.
    """
    path = _existing_checkpoint(ckpt_path)
    try:
        keys = set(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception as err:
        raise ConfigError(
            f"ckpt_path={ckpt_path} is not a readable checkpoint ({type(err).__name__}: {err})"
        ) from err
    missing = {"state_dict", "global_step", "loops", "optimizer_states"} - keys
    if missing:
        raise ConfigError(
            f"ckpt_path={ckpt_path} is not a Lightning training checkpoint: it lacks "
            f"{sorted(missing)} (it has {sorted(keys)}); pretrained weights go in model.pretrained="
        )


def train(cfg: DictConfig) -> float | None:
    """Seed, build, fit (resuming from `ckpt_path`), test the best checkpoint, return `optimized_metric`.

    The final metrics also go to `<run>/metrics.json`.
    """
    with _wandb_run_closed_after():
        check_run(cfg)
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.get("resume"), cfg.paths.output_dir)
        if ckpt_path:
            _training_checkpoint(ckpt_path)
            log.info("Resuming from %s", ckpt_path)
        prepare_run(cfg)
        datamodule = instantiate(cfg.data, "data")
        model = build_classifier(cfg)
        trainer = build_trainer(cfg)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = _scalars(trainer.callback_metrics)

        if cfg.get("test"):
            best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
            trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
            metrics.update(_scalars(trainer.callback_metrics))

    _finish(metrics, cfg.paths.output_dir)
    metric_name = cfg.get("optimized_metric")
    return metrics.get(metric_name) if metric_name else None


def _run_config_from_checkpoint(ckpt_path: str) -> dict[str, Any]:
    path = _existing_checkpoint(ckpt_path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
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


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint. The model and data come from the run config saved in the checkpoint
    unless the command line picks others (`model=...`, `data=...`); `+data.batch_size=...`
    changes one field of the saved data config."""
    run_cfg = _run_config_from_checkpoint(cfg.ckpt_path)
    with open_dict(cfg):
        for key in ("model", "data"):
            chosen = cfg.get(key)
            if chosen is None or "_target_" not in chosen:  # not picked, or only `+key.field=...`
                cfg[key] = OmegaConf.merge(run_cfg[key], chosen or {})
        cfg.classifier = run_cfg.get("classifier", {})
    with _wandb_run_closed_after():
        prepare_run(cfg)
        datamodule = instantiate(cfg.data, "data")
        model = build_classifier(cfg, with_optimizer=False)
        trainer = build_trainer(cfg)
        trainer.test(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        metrics = _scalars(trainer.callback_metrics)
    _finish(metrics, cfg.paths.output_dir)
    return metrics


def run_task(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run `train` or `evaluate` and record the outcome in `<run>/status.json`.

    A `VitlabError` (the user's mistake) becomes a short message and exit status 2;
    HYDRA_FULL_ERROR=1 shows the traceback instead. Inside a multirun a failed job
    (any exception, a NaN loss included) is logged and returns NaN so that the
    other jobs still run; `vitlab.runs.multirun.SweepSummary` then fails the sweep. A run
    stopped by SIGTERM or Ctrl+C (`vitlab.training.signals.GracefulStop`) has saved `last.ckpt`
    and exits 128 + the signal's number (143, 130), as a process that a signal ended.
    """
    output_dir = cfg.paths.output_dir
    try:
        result = task(cfg)
    except Interrupted as err:
        record_status(output_dir, "interrupted", error=str(err))
        print(f"\n{err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except Exception as err:
        record_status(output_dir, "failed", error=f"{type(err).__name__}: {err}")
        if is_multirun():
            log.error(
                "Job failed: %s: %s",
                type(err).__name__,
                err,
                exc_info=not isinstance(err, VitlabError),
            )
            return float("nan")
        if isinstance(err, VitlabError):
            exit_with(err)
        raise
    record_status(output_dir, "completed")
    return result
