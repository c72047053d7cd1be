"""`train(cfg)` and `evaluate(cfg)`, and `run_task`, which turns their outcome into an exit status.

The entry points in `src/` compose a config with Hydra and call one of these through
`run_task`. The objects come from `vitlab.runs.build`; each run writes its final
metrics to `<run>/metrics.json` and its outcome to `<run>/status.json`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from vitlab.errors import ConfigError, Interrupted, VitlabError, exit_with
from vitlab.runs.build import build_classifier, build_trainer, instantiate
from vitlab.runs.checkpoint_files import (
    check_ema_weights,
    check_model_matches,
    check_training_checkpoint,
    run_config_of,
)
from vitlab.runs.classes import fill_num_classes
from vitlab.runs.console import print_config_tree, print_metrics
from vitlab.runs.failures import log_traceback, one_line
from vitlab.runs.multirun import is_multirun, record_status
from vitlab.runs.provenance import record_provenance
from vitlab.runs.resume import resolve_ckpt_path
from vitlab.runs.validate import check_run, patch_size_change_problem
from vitlab.training.allocator import retain_freed_memory

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
RUN_CONFIG_FILE = "run_config.yaml"


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


def train(cfg: DictConfig) -> float | None:
    """Seed, build, fit (resuming from `ckpt_path`), test the best checkpoint, return `optimized_metric`.

    The final metrics also go to `<run>/metrics.json`.
    """
    with _wandb_run_closed_after():
        fill_num_classes(cfg)
        check_run(cfg)
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.get("resume"), cfg.paths.output_dir)
        if ckpt_path:
            check_training_checkpoint(ckpt_path)
            check_model_matches(ckpt_path, OmegaConf.to_container(cfg.model, resolve=True))
            log.info("Resuming from %s", ckpt_path)
        prepare_run(cfg)
        datamodule = instantiate(cfg.data, "data")
        model = build_classifier(cfg, class_names=datamodule.class_names)
        trainer = build_trainer(cfg)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = scalar_metrics(trainer.callback_metrics)

        if cfg.get("test"):
            best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
            trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
            metrics.update(scalar_metrics(trainer.callback_metrics))

    write_metrics(metrics, cfg.paths.output_dir)
    metric_name = cfg.get("optimized_metric")
    return metrics.get(metric_name) if metric_name else None


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint. The model and data come from the run config saved in the checkpoint
    unless the command line picks others (`model=...`, `data=...`); `+data.batch_size=...`
    changes one field of the saved data config. `ema=true` tests the checkpoint's EMA
    weights (`vitlab.training.ema`): the metrics `test/*` are then the EMA's."""
    # The eval keys, `ckpt_path` first; model and data come from the checkpoint, checked below.
    check_run(OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("model", "data")]))
    run_cfg = run_config_of(cfg.ckpt_path)
    if cfg.get("ema"):
        check_ema_weights(cfg.ckpt_path)
    with open_dict(cfg):
        for key in ("data", "model"):  # data first: the model reads ${data.*}
            chosen = cfg.get(key)
            if chosen is None or "_target_" not in chosen:  # not picked, or only `+key.field=...`
                cfg[key] = OmegaConf.merge(run_cfg[key], chosen or {})
                if key == "model" and (
                    problem := patch_size_change_problem(run_cfg[key], cfg[key])
                ):
                    raise ConfigError(problem)
            elif key == "model":
                check_model_matches(cfg.ckpt_path, OmegaConf.to_container(chosen, resolve=True))
        # Runs saved before `loss` was named so kept their label smoothing under `classifier`.
        cfg.loss = run_cfg.get("loss", run_cfg.get("classifier", {}))
    fill_num_classes(cfg)
    check_run(cfg)
    save_run_config(cfg, cfg.paths.output_dir)
    with _wandb_run_closed_after():
        prepare_run(cfg)
        datamodule = instantiate(cfg.data, "data")
        model = build_classifier(cfg, with_optimizer=False, class_names=datamodule.class_names)
        model.ema_weights = bool(cfg.get("ema"))
        trainer = build_trainer(cfg)
        trainer.test(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        metrics = scalar_metrics(trainer.callback_metrics)
    write_metrics(metrics, cfg.paths.output_dir)
    return metrics


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The single-number entries of `trainer.callback_metrics`, as floats.

    Not Lightning's `convert_tensors_to_scalars`, which raises on a tensor of several elements.
    """
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, torch.Tensor)) and torch.as_tensor(v).numel() == 1
    }


@rank_zero_only
def save_run_config(cfg: DictConfig, output_dir: str) -> None:
    """Write `<output_dir>/run_config.yaml`: the config as run, with the model and data that
    came from the checkpoint, which Hydra's `.hydra/config.yaml` of an eval run lacks
    (`vitlab.reports.runs` reads both, so `compare.py` knows what an eval job tested)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(output_dir) / RUN_CONFIG_FILE)


@rank_zero_only  # DDP ranks share the folder; rank 0 writes and prints
def write_metrics(metrics: dict[str, float], output_dir: str) -> None:
    """Write `<output_dir>/metrics.json` and print the metrics table."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / METRICS_FILE).write_text(
        json.dumps(metrics, indent=2, sort_keys=True) + "\n"
    )
    print_metrics(metrics, output_dir)


@contextmanager
def _wandb_run_closed_after() -> Iterator[None]:
    """Close the W&B run, if one is open, when the block ends: the next run (or the next
    job of a multirun) must start its own, and a failure must be marked as one.
    Lightning's `WandbLogger` leaves the run open when `fit` or `test` ends."""
    failed = True
    try:
        yield
        failed = False
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)


def run_task(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run `train` or `evaluate` and record the outcome in `<run>/status.json`.

    A `VitlabError` (the user's mistake) becomes a short message and exit status 2;
    any other exception one line naming where it came from (`vitlab.runs.failures`),
    its traceback in the run's log file, and exit status 1. HYDRA_FULL_ERROR=1 shows
    the traceback instead. Inside a multirun a failed job
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
        notes = "".join(f"\n{note}" for note in getattr(err, "__notes__", ()))
        record_status(output_dir, "failed", error=f"{type(err).__name__}: {err}{notes}")
        expected = isinstance(err, VitlabError)
        files = [] if expected else log_traceback(err)
        if is_multirun():
            log.error("Job failed: %s", f"{err}{notes}" if expected else one_line(err))
            return float("nan")
        if expected:
            exit_with(err)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        where = f"the traceback is in {files[0]}" if files else "the traceback was not logged"
        print(
            f"\nError: {one_line(err)}\n({where}; HYDRA_FULL_ERROR=1 shows it here)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    record_status(output_dir, "completed")
    return result
