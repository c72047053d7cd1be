"""`export(cfg)`: a model file for deployment that proves itself against PyTorch before it is kept.

`python src/export.py ckpt_path=<run .ckpt | official .npz | timm file>` reads the model
(`vitlab.deploy.source.load_source`) and writes it as ONNX (`format=onnx`: torch.onnx's
torch.export-based exporter, with a dynamic batch axis) or as a `torch.export` program
(`format=pt2`, `torch.export.save`). The written file is then loaded as a deployment
loads it (an onnxruntime CPU session; `torch.export.load`) and run beside the PyTorch
model on the checkpoint's test split, or on synthetic images (`vitlab.deploy.parity`).

A float32 export whose largest logit difference is over `MAX_LOGIT_DIFFERENCE`, or
that picks another top-1 class for any image, raises `ExportCheckError`: the file is
left only as `model.<ext>.rejected`, and no `preprocess.json` or `labels.json` is
written, so the folder holds nothing a deployment would pick up. Files are written
under a temporary folder and moved to their names only once the check has passed.

The export traces the model's reference path: `torch.export` counts as compiling
(`torch.compiler.is_compiling`), so the speed paths of `vitlab.models.fast` that have no
ONNX op step aside. `quantize=int8` adds a dynamic int8 model (`vitlab.deploy.quantize`)
to the check, with its accuracy change, size and latency shown and no threshold.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import DictConfig
from torch import nn

from vitlab.deploy.labels import class_names_for, write_labels_json
from vitlab.deploy.parity import (
    Candidate,
    CheckImages,
    Measured,
    Runner,
    check_images,
    compare,
    print_table,
    torch_runner,
)
from vitlab.deploy.preprocess import PREPROCESS_FILE
from vitlab.deploy.quantize import quantize_onnx, quantize_torch, serialized_size
from vitlab.deploy.source import ModelSource, load_source
from vitlab.errors import ExportCheckError
from vitlab.runs.tasks import prepare_run
from vitlab.runs.validate import check_run

ExportFormat = Literal["onnx", "pt2"]
MODEL_FILES: dict[str, str] = {"onnx": "model.onnx", "pt2": "model.pt2"}
INT8_FILES: dict[str, str] = {"onnx": "model.int8.onnx"}  # pt2: no int8 file (`quantize`)
REJECTED_SUFFIX = ".rejected"
REPORT_FILE = "export.json"
# A float32 export may differ from PyTorch by this much on a logit (float rounding of
# other kernels is about 1e-6), and must agree on every image's top-1 class.
MAX_LOGIT_DIFFERENCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# ONNX's protobuf holds at most 2 GiB; larger weights go to a `.data` file beside it.
ONNX_SINGLE_FILE_LIMIT = 2**31 - 2**26
# The graph passes of torch.onnx's exporter, which log at INFO.
ONNX_PASS_LOGGERS = ("onnx_ir", "onnxscript")
PYTORCH, PYTORCH_INT8 = "PyTorch fp32", "PyTorch int8 (eager)"


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export, check and report the model `cfg.ckpt_path` holds (module docstring).

    Writes the model file, `preprocess.json`, `labels.json` and `export.json` (the
    numbers of the check) into the run folder; returns those numbers.
    """
    check_run(cfg)
    prepare_run(cfg)
    source = load_source(
        cfg.ckpt_path, key="ckpt_path", timm_name=cfg.get("timm_name"), ema=cfg.get("ema", False)
    )
    images = check_images(
        source.data_config, source.preprocess, cfg.check_images, cfg.batch_size, cfg.seed or 0
    )
    run_dir = Path(cfg.paths.output_dir)
    measured = _export_checked(cfg, source.model.eval(), images, run_dir)
    (run_dir / PREPROCESS_FILE).write_text(source.preprocess.to_json())
    write_labels_json(class_names_for(source), run_dir)
    report = _report(cfg, source, measured, images)
    (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(f"Exported to {run_dir}")
    return report


def _export_checked(
    cfg: DictConfig, model: nn.Module, images: CheckImages, run_dir: Path
) -> dict[str, Measured]:
    """Write the model file(s) in a staging folder, check them, and move them into `run_dir`
    only if the float32 export passes; else leave it as `<file>.rejected` and raise."""
    fmt: ExportFormat = cfg.format
    staging = run_dir / ".export"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        exported = staging / MODEL_FILES[fmt]
        if fmt == "onnx":
            write_onnx(model, exported, images.batches[0][0], cfg.opset)
        else:
            write_pt2(model, exported, images.batches[0][0])
        others = [_loaded(fmt, exported, f"{fmt.upper()} fp32 ({exported.name})")]
        if cfg.quantize == "int8":
            others.append(_int8(fmt, model, exported))
        reference = Candidate(PYTORCH, torch_runner(model), serialized_size(model))
        measured = compare(reference, others, images, cfg.latency_batches)
        print_table(measured, images)
        fp32 = measured[others[0].name]
        if not _passes(fp32):
            rejected = run_dir / (exported.name + REJECTED_SUFFIX)
            exported.replace(rejected)
            raise ExportCheckError(_rejection(fmt, fp32, images, rejected))
        for written in staging.iterdir():
            written.replace(run_dir / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return measured


def write_onnx(model: nn.Module, path: Path, images: torch.Tensor, opset: int = 20) -> Path:
    """`model` as ONNX at `path`: input `images` (batch, c, h, w), output `logits`
    (batch, classes), the batch axis dynamic (`images`: any batch of the input's shape).
    One file, unless the weights exceed what one protobuf holds (then `<path>.data` too)."""
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for name in ONNX_PASS_LOGGERS:  # one INFO line per graph rewrite otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (_example(images),),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=_DYNAMIC_BATCH,
            opset_version=opset,
            external_data=size > ONNX_SINGLE_FILE_LIMIT,
            dynamo=True,
            verbose=False,
        )
    return path


def write_pt2(model: nn.Module, path: Path, images: torch.Tensor) -> Path:
    """`model` as a `torch.export` program at `path` (`torch.export.save`), the batch axis
    dynamic (`images`: any batch of the input's shape)."""
    with torch.no_grad():
        program = torch.export.export(model, (_example(images),), dynamic_shapes=_DYNAMIC_BATCH)
    torch.export.save(program, str(path))
    return path


_DYNAMIC_BATCH = ({0: torch.export.Dim("batch")},)


def _example(images: torch.Tensor) -> torch.Tensor:
    """Two of the images (the first, twice if need be): torch.export would fix a batch of 1."""
    return images[:1].repeat(2, 1, 1, 1)


def onnx_runner(path: Path) -> Runner:
    """An onnxruntime CPU session of the ONNX file at `path`, as a `Runner`."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # Idle threads sleep instead of spinning, so the PyTorch model timed beside this one
    # gets the cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        return torch.from_numpy(logits)

    return run


def pt2_runner(path: Path) -> Runner:
    """The program `torch.export.save` wrote at `path`, loaded, as a `Runner`."""
    module = torch.export.load(str(path)).module()

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(images)

    return run


RUNNERS: dict[str, Callable[[Path], Runner]] = {"onnx": onnx_runner, "pt2": pt2_runner}


def _loaded(fmt: ExportFormat, path: Path, name: str) -> Candidate:
    """The written file at `path`, loaded as a deployment loads it."""
    return Candidate(name, RUNNERS[fmt](path), _file_size(path))


def _int8(fmt: ExportFormat, model: nn.Module, exported: Path) -> Candidate:
    """The int8 model of the format: onnxruntime's, written beside the float one; or
    PyTorch's, eager and not written (`vitlab.deploy.quantize`)."""
    if fmt == "onnx":
        int8 = quantize_onnx(exported, exported.with_name(INT8_FILES[fmt]))
        return _loaded(fmt, int8, f"ONNX int8 ({int8.name})")
    quantized = quantize_torch(model)
    return Candidate(PYTORCH_INT8, torch_runner(quantized), serialized_size(quantized))


def _file_size(path: Path) -> int:
    """Bytes of `path`, and of its ONNX external-data file if it has one."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _passes(fp32: Measured) -> bool:
    return fp32.max_abs_diff <= MAX_LOGIT_DIFFERENCE and fp32.agreement == 1.0


def _rejection(fmt: ExportFormat, fp32: Measured, images: CheckImages, rejected: Path) -> str:
    return (
        f"the {fmt} export does not compute what the PyTorch model computes on {images.count} "
        f"images ({images.description}): largest logit difference {fp32.max_abs_diff:.2e} (at "
        f"most {MAX_LOGIT_DIFFERENCE:g} allowed), top-1 agreement {fp32.agreement:.2%} (100% "
        f"needed). Nothing usable was written: the file is kept only as {rejected}, for inspection"
    )


def _report(
    cfg: DictConfig, source: ModelSource, measured: dict[str, Measured], images: CheckImages
) -> dict[str, Any]:
    """`export.json`: what was exported and each model's numbers against PyTorch fp32."""
    return {
        "ckpt_path": source.label,
        "kind": source.kind,
        # A run checkpoint's trained weights, or its EMA weights (`ema=true`).
        "weights": "ema" if cfg.get("ema") else "trained",
        "format": cfg.format,
        "quantize": cfg.quantize,
        "opset": cfg.opset if cfg.format == "onnx" else None,
        "check_images": images.count,
        "check_data": images.description,
        "batch_size": cfg.batch_size,
        "max_logit_difference_allowed": MAX_LOGIT_DIFFERENCE,
        "models": {
            name: {
                "max_abs_logit_diff": m.max_abs_diff,
                "top1_agreement": m.agreement,
                "accuracy": m.accuracy,
                "size_bytes": m.size_bytes,
                "latency_ms_per_batch": m.latency_s * 1e3,
            }
            for name, m in measured.items()
        },
    }
