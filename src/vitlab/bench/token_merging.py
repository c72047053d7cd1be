"""`bench.task=token_merging`: what ToMe buys one model without retraining, at several r.

`python src/bench.py bench.task=token_merging model=vit_s16` measures inference of the
model (random weights) with its `token_merging` set to each r of `bench.token_merging`:
eval mode, `torch.inference_mode`, one batch of `data.batch_size` test images already on
the device (`vitlab.bench.loops.InferenceLoop`). The r take their turns as the race's
contenders do (`vitlab.bench.race.Race`: warm-up rounds, then rounds in an order
reversed every round); img/s is the median over rounds, the speed-up the median of the
per-round ratios to r = 0. With `ckpt_path=<run>/checkpoints/last.ckpt` the model, its
weights and the data come from the checkpoint's saved run config, as `src/eval.py`
reads them, and the top-1 accuracy on that data's test split is measured at every r
too. The model runs eagerly (`compile` is not applied: every r would recompile).

The report goes to `<run>/bench.md` and `<run>/bench.json`, as the race's does, with
one more table: r, the tokens entering each block, img/s, speed-up, accuracy.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.data import DataLoader

from vitlab.bench.loops import INFER, Contender, InferenceLoop, autocast_for, input_dtype_for
from vitlab.bench.machine import bench_device, describe_machine, load_average
from vitlab.bench.race import BenchSettings, Race, compute_dtype, param_count
from vitlab.bench.report import bench_report, markdown_report
from vitlab.deploy.source import load_source
from vitlab.errors import ConfigError
from vitlab.models.tome import token_counts
from vitlab.runs.build import build_backbone, instantiate
from vitlab.runs.checkpoint_files import run_config_of
from vitlab.runs.classes import fill_num_classes
from vitlab.runs.tasks import prepare_run
from vitlab.runs.validate import check_run
from vitlab.training.flops import count_flops

log = logging.getLogger(__name__)


def bench_token_merging(cfg: DictConfig) -> dict[str, float]:
    """Measure img/s (and, with `ckpt_path`, test accuracy) at every r of `bench.token_merging`;
    write `bench.md` and `bench.json` into the run folder, print the tables, return the numbers."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        _take_model_and_data_from(cfg, ckpt_path)
    check_run(cfg)
    settings = BenchSettings(**OmegaConf.to_container(cfg.bench, resolve=True))
    device = bench_device(cfg.trainer)
    precision = str(cfg.trainer.precision)
    dtype = compute_dtype(precision)
    prepare_run(cfg)

    model = (
        load_source(ckpt_path, key="ckpt_path").model if ckpt_path else build_backbone(cfg.model)
    )
    _check_merges(model, settings.token_merging)
    model.to(device)
    if precision.endswith("-true"):
        model.to(input_dtype_for(precision))
    data = instantiate(cfg.data, "data")
    data.setup("test")
    images, _ = next(iter(data.test_dataloader()))
    images = images.to(device, input_dtype_for(precision))
    contenders = [_contender(model, r, images, precision) for r in settings.token_merging]

    machine = describe_machine(device)
    race = Race(contenders, settings, device, dtype)
    for _ in race.rounds():  # no fit among the contenders: the rounds run without yielding
        pass
    machine["load_average_1min_after"] = load_average()
    accuracy = (
        {
            r: top1_accuracy(model, r, data.test_dataloader(), precision)
            for r in settings.token_merging
        }
        if ckpt_path
        else {}
    )

    report = bench_report(
        cfg, asdict(settings), tuple(images.shape), machine, race.peak_flops, contenders
    )
    if ckpt_path:
        report["model"] = f"{type(model).__name__} of {ckpt_path}"
    report["ckpt_path"] = ckpt_path
    report["token_merging"] = _rows(model, settings.token_merging, contenders, accuracy)
    table = _write(report, Path(cfg.paths.output_dir))
    print(table)
    return {
        f"r={row['r']}/{name}": row[name]
        for row in report["token_merging"]
        for name in ("images_per_sec", "test_acc")
        if row[name] is not None
    }


def _take_model_and_data_from(cfg: DictConfig, ckpt_path: str) -> None:
    """The checkpoint's saved `data` and `model` replace the configured ones, as `evaluate` does."""
    run_cfg = run_config_of(ckpt_path)
    with open_dict(cfg):
        for key in ("data", "model"):  # data first: the model reads ${data.*}
            cfg[key] = run_cfg[key]
    fill_num_classes(cfg)


def _check_merges(model: nn.Module, rs: list[int]) -> None:
    """ConfigError unless `model` is a ViT whose position encoding can merge tokens."""
    if not hasattr(model, "token_merging"):
        raise ConfigError(
            f"bench.task=token_merging merges a ViT's tokens; {type(model).__name__} has none "
            "(use a ViT or hybrid model, or bench.task=race)"
        )
    try:
        model.token_merging = max(rs)
    except ValueError as err:
        raise ConfigError(f"bench.token_merging={list(rs)}: {err}") from None


def _contender(model: nn.Module, r: int, images: torch.Tensor, precision: str) -> Contender:
    """Inference of `model` with `token_merging=r`, warmed up, its peak memory measured."""
    loop = InferenceLoop(model, images, images.device, precision)
    model.token_merging = r
    memory = loop.warm_up_and_measure_memory()
    return Contender(
        "vitlab",
        INFER,
        f"ToMe r={r}",
        partial(_run_at, model, r, loop),
        count_flops(model, tuple(images.shape), train=False) / images.shape[0],
        param_count(model),
        memory,
    )


def _run_at(model: nn.Module, r: int, loop: InferenceLoop, steps: int) -> float:
    model.token_merging = r
    return loop.run(steps)


def top1_accuracy(model: nn.Module, r: int, loader: DataLoader, precision: str) -> float:
    """Top-1 accuracy of `model` with `token_merging=r` over `loader`, as inference runs it."""
    device = next(model.parameters()).device
    model.token_merging = r
    model.eval()
    correct = total = 0
    with torch.inference_mode(), autocast_for(precision, device):
        for images, labels in loader:
            logits = model(images.to(device, input_dtype_for(precision)))
            correct += int((logits.argmax(dim=-1).cpu() == labels).sum())
            total += labels.shape[0]
    return correct / total


def _rows(
    model: nn.Module, rs: list[int], contenders: list[Contender], accuracy: dict[int, float]
) -> list[dict[str, Any]]:
    """One entry per r: the tokens entering each block, img/s, speed-up over r = 0, accuracy."""
    baseline = contenders[rs.index(0)].samples if 0 in rs else None
    tokens = model.num_prefix_tokens + model.grid[0] * model.grid[1]
    rows = []
    for r, contender in zip(rs, contenders, strict=True):
        per_round = (
            [x / y for x, y in zip(contender.samples, baseline, strict=True)] if baseline else None
        )
        rows.append(
            {
                "r": r,
                "tokens_per_block": token_counts(
                    tokens, r, len(model.blocks), model.cls_token is not None
                )[:-1],
                "images_per_sec": contender.median,
                "images_per_sec_min": min(contender.samples),
                "images_per_sec_max": max(contender.samples),
                "speedup": statistics.median(per_round) if per_round else None,
                "test_acc": accuracy.get(r),
            }
        )
    return rows


def _write(report: dict[str, Any], output_dir: Path) -> str:
    """`bench.json` and `bench.md` (the race's tables, then ToMe's) in `output_dir`; the Markdown."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_report(report) + "\n" + "\n".join(_token_merging_table(report)) + "\n"
    (output_dir / "bench.md").write_text(table)
    return table


def _token_merging_table(report: dict[str, Any]) -> list[str]:
    where = report["ckpt_path"] or "random weights: throughput only"
    lines = [
        f"Token merging (ToMe), no retraining ({where}):",
        "",
        "| r | tokens entering each block | img/s (min–max) | speed-up vs r=0 | test acc |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for row in report["token_merging"]:
        speedup, acc = row["speedup"], row["test_acc"]
        lines.append(
            f"| {row['r']} | {' → '.join(map(str, row['tokens_per_block']))} "
            f"| {row['images_per_sec']:.4g} ({row['images_per_sec_min']:.4g}–"
            f"{row['images_per_sec_max']:.4g}) "
            f"| {'—' if speedup is None else f'{speedup:.2f}x'} "
            f"| {'—' if acc is None else f'{acc:.2%}'} |"
        )
    return lines
