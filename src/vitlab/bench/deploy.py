"""`bench.task=deploy`: inference latency as a deployment sees it, ours against timm's twin.

`python src/bench.py bench.task=deploy model=vit_s16 data.image_size=224` measures, on the
CPU, batch 1 and batch 32 (`BATCH_SIZES`) of the model with random weights in each
runtime (`RUNTIMES`):

- PyTorch eager fp32: eval mode, `torch.inference_mode`;
- PyTorch dynamic int8: `vitlab.deploy.quantize.quantize_torch`, eager;
- onnxruntime fp32: the file `vitlab.deploy.export.write_onnx` writes, in a CPU session
  (`onnx_runner`);
- onnxruntime int8: that file through `vitlab.deploy.quantize.quantize_onnx`;
- torch.compile: inductor's defaults, fp32, one static graph per batch size.

timm's model with the same dims (`vitlab.bench.timm_models`; `bench.timm=false` leaves it
out) runs in the same runtimes, exported and quantized the same way. Every (model,
runtime, batch) is a contender of one race (`vitlab.bench.race.Race`): warm-up rounds,
then rounds in an order reversed every round, so that a machine that slows down hits
them alike. A contender's time is the median over rounds of its `bench.steps` batches;
ours/timm is the median of the per-round ratios of their speeds (> 1: ours is faster).
The report goes to `<run>/deploy.md` and `<run>/deploy.json`.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vitlab.bench.loops import INFER, Contender, images_per_second, seconds_of_one_call
from vitlab.bench.machine import describe_machine, load_average
from vitlab.bench.race import BenchSettings, Race, param_count
from vitlab.bench.report import bench_report, markdown_report
from vitlab.bench.timm_models import timm_model
from vitlab.deploy.export import onnx_runner, write_onnx
from vitlab.deploy.quantize import quantize_onnx, quantize_torch
from vitlab.models import fast
from vitlab.models.inductor import cpu_compile_problem
from vitlab.runs.build import build_backbone
from vitlab.runs.tasks import prepare_run
from vitlab.runs.validate import check_run
from vitlab.training.flops import count_flops

BATCH_SIZES = (1, 32)
RUNTIMES = {
    "eager": "PyTorch eager fp32",
    "int8": "PyTorch dynamic int8",
    "onnx": "onnxruntime fp32",
    "onnx_int8": "onnxruntime int8",
    "compile": "torch.compile (inductor)",
}
CPU = torch.device("cpu")
COMPILE = {"dynamic": False}  # torch.compile's keywords: one static graph per batch size
log = logging.getLogger(__name__)
# An image batch -> logits, in one runtime.
Step = Callable[[torch.Tensor], Any]


def deploy_bench(cfg: DictConfig, runtimes: Sequence[str] = tuple(RUNTIMES)) -> dict[str, float]:
    """Race every (model, runtime, batch size) (module docstring); write `deploy.md` and
    `deploy.json` into the run folder, print the tables, return the ours/timm ratios.

    `runtimes`: the keys of `RUNTIMES` to measure, in table order.
    """
    check_run(cfg)
    settings = BenchSettings(**OmegaConf.to_container(cfg.bench, resolve=True))
    left_out = cpu_compile_problem({}) if "compile" in runtimes else None
    if left_out is not None:
        log.warning("bench.task=deploy: %s. The torch.compile runtime is left out.", left_out)
        runtimes = [r for r in runtimes if r != "compile"]
    prepare_run(cfg)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    models = {"vitlab": (build_backbone(cfg.model).eval(), "vitlab")}
    if settings.timm:
        timm, description = timm_model(model_cfg)
        if param_count(timm) != param_count(models["vitlab"][0]):
            raise RuntimeError(
                f"{description} has {param_count(timm)} parameters, vitlab's model "
                f"{param_count(models['vitlab'][0])}: not the same architecture, so no fair race"
            )
        models["timm"] = (timm.eval(), description)
    generator = torch.Generator().manual_seed(cfg.get("seed") or 0)
    side, channels = int(cfg.data.image_size), int(cfg.data.num_channels)
    images = torch.rand(max(BATCH_SIZES), channels, side, side, generator=generator) * 2 - 1

    with tempfile.TemporaryDirectory() as folder:
        contenders = {
            (runtime, batch, source): _contender(
                source, model, description, runtime, images[:batch], Path(folder)
            )
            for runtime in runtimes
            for batch in BATCH_SIZES
            for source, (model, description) in models.items()
        }
        machine = describe_machine(CPU)
        race = Race(list(contenders.values()), settings, CPU, torch.float32)
        for _ in race.rounds():  # no fit among the contenders: the rounds run without yielding
            pass
    machine["load_average_1min_after"] = load_average()

    report = bench_report(
        cfg,
        asdict(settings),
        tuple(images.shape),
        machine,
        race.peak_flops,
        race.contenders,
        left_out,
    )
    report["batch_size"] = " and ".join(map(str, BATCH_SIZES))
    report["ratios"] = {}  # the race's ratios pair one inference per model; ours are below
    report["deploy"] = _rows(contenders, runtimes)
    table = _write(report, Path(cfg.paths.output_dir))
    print(table)
    return {
        f"{row['runtime']}, batch {row['batch_size']}": row["ours_over_timm"]
        for row in report["deploy"]
        if row["ours_over_timm"] is not None
    }


def _contender(
    source: str,
    model: nn.Module,
    description: str,
    runtime: str,
    images: torch.Tensor,
    folder: Path,
) -> Contender:
    """`model` in `runtime` on `images`, built, exported or compiled, and run once untimed
    (a compiled one's compile: its `compile_seconds`)."""
    step = _step(model, runtime, folder / source, images)
    first_call = seconds_of_one_call(partial(step, images), CPU)
    batch = images.shape[0]
    compiled = runtime == "compile"
    return Contender(
        source,
        INFER,
        f"{description}, {RUNTIMES[runtime]}, batch {batch}",
        partial(images_per_second, partial(step, images), images=batch, device=CPU),
        count_flops(model, tuple(images.shape), train=False) / batch,
        param_count(model),
        compiled=compiled,
        compile_seconds=first_call if compiled else None,
    )


def _step(model: nn.Module, runtime: str, stem: Path, images: torch.Tensor) -> Step:
    """What one batch runs in `runtime`; the ONNX files go to `<stem>.onnx`, `<stem>.int8.onnx`."""
    if runtime == "eager":
        return _inference(model)
    if runtime == "int8":
        return _inference(quantize_torch(model))
    if runtime == "compile":
        fast.choose_compiled_gelu(COMPILE)
        return _inference(torch.compile(model, **COMPILE))
    onnx_file = stem.with_suffix(".onnx")
    if not onnx_file.exists():  # one file per model serves every batch size
        write_onnx(model, onnx_file, images)
    if runtime == "onnx":
        return onnx_runner(onnx_file)
    int8_file = stem.with_suffix(".int8.onnx")
    if not int8_file.exists():
        quantize_onnx(onnx_file, int8_file)
    return onnx_runner(int8_file)


def _inference(model: nn.Module) -> Step:
    def step(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(images)

    return step


def _rows(
    contenders: dict[tuple[str, int, str], Contender], runtimes: Sequence[str]
) -> list[dict[str, Any]]:
    """One entry per (runtime, batch): ms per batch of each model, and ours/timm's speed."""
    rows = []
    for runtime in runtimes:
        for batch in BATCH_SIZES:
            ours = contenders[runtime, batch, "vitlab"]
            theirs = contenders.get((runtime, batch, "timm"))
            per_round = (
                [a / b for a, b in zip(ours.samples, theirs.samples, strict=True)]
                if theirs
                else None
            )
            rows.append(
                {
                    "runtime": RUNTIMES[runtime],
                    "batch_size": batch,
                    "ours_ms": _ms(ours, batch),
                    "timm_ms": _ms(theirs, batch),
                    "ours_over_timm": statistics.median(per_round) if per_round else None,
                    "ours_over_timm_min": min(per_round) if per_round else None,
                    "ours_over_timm_max": max(per_round) if per_round else None,
                }
            )
    return rows


def _ms(contender: Contender | None, batch: int) -> float | None:
    """Milliseconds per batch at the contender's median speed."""
    return None if contender is None else batch / contender.median * 1e3


def _write(report: dict[str, Any], output_dir: Path) -> str:
    """`deploy.json` and `deploy.md` (the contenders, then ours against timm's) in `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "deploy.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_report(report) + "\n" + "\n".join(_deploy_table(report["deploy"])) + "\n"
    (output_dir / "deploy.md").write_text(table)
    return table


def _deploy_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "Deployment latency, ms per batch (median over rounds); ours/timm is the ratio of "
        "speeds, > 1: ours is faster:",
        "",
        "| runtime | batch | ours (ms) | timm (ms) | ours/timm (min–max) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        ratio = row["ours_over_timm"]
        lines.append(
            f"| {row['runtime']} | {row['batch_size']} | {_fmt(row['ours_ms'])} "
            f"| {_fmt(row['timm_ms'])} | "
            + (
                "—"
                if ratio is None
                else f"{ratio:.2f} ({row['ours_over_timm_min']:.2f}–{row['ours_over_timm_max']:.2f})"
            )
            + " |"
        )
    return lines


def _fmt(ms: float | None) -> str:
    return "—" if ms is None else f"{ms:.3g}"
