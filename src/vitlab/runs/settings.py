"""The config nodes that configure no class: the top-level keys of each entry point, `loss`, `extras`, `paths`.

Each dataclass mirrors its node in `conf/` (field for key, with the same default),
so `vitlab.runs.schema` checks these keys as it checks a constructor's arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from annotated_types import Ge, Interval

from vitlab.bounds import Count, Rate

# Lightning's `seed_everything` takes seeds in this range.
Seed = Annotated[int, Interval(ge=0, le=2**32 - 1)]


@dataclass(kw_only=True)
class RunSettings:
    """Top-level keys every entry point has (`conf/{train,eval,bench}.yaml`)."""

    task_name: str
    tags: list[str] = field(default_factory=list)
    # null: no seeding (a different run every time).
    seed: Seed | None = 42


@dataclass(kw_only=True)
class TrainSettings(RunSettings):
    """Top-level keys of `conf/train.yaml` (its comments say what each does)."""

    sweep_name: str | None = None
    # false/null: eager; true: torch.compile's defaults; a mapping: torch.compile's keywords.
    compile: bool | dict[str, Any] | None = False
    ckpt_path: str | None = None
    resume: Literal["auto"] | None = None
    run_dir: str | None = None
    test: bool = True
    optimized_metric: str | None = None


@dataclass(kw_only=True)
class EvalSettings(RunSettings):
    """Top-level keys of `conf/eval.yaml`: the checkpoint to test is required."""

    ckpt_path: str
    # Test the checkpoint's EMA weights (`ema_state_dict`) instead of its trained ones.
    ema: bool = False


@dataclass(kw_only=True)
class PredictSettings(RunSettings):
    """Top-level keys of `conf/predict.yaml` (its comments say what each does)."""

    # Nothing in prediction is random: no seed by default.
    seed: Seed | None = None
    model_path: str
    inputs: str
    top_k: Count = 5
    batch_size: Count = 32
    out: str | None = None
    timm_name: str | None = None
    ema: bool = False


@dataclass(kw_only=True)
class ExportSettings(RunSettings):
    """Top-level keys of `conf/export.yaml` (its comments say what each does)."""

    ckpt_path: str
    timm_name: str | None = None
    format: Literal["onnx", "pt2"] = "onnx"
    quantize: Literal["int8"] | None = None
    opset: Annotated[int, Ge(18)] = 20
    check_images: Count | None = 512
    batch_size: Count = 32
    latency_batches: Count = 5
    ema: bool = False


@dataclass(kw_only=True)
class BenchRunSettings(RunSettings):
    """Top-level keys of `conf/bench.yaml` (its `bench` node is `vitlab.bench.race.BenchSettings`)."""

    compile: bool | dict[str, Any] | None = False
    # A run checkpoint whose model and test split `bench.task=token_merging` measures.
    ckpt_path: str | None = None


@dataclass(kw_only=True)
class Loss:
    """The `loss` node: cross-entropy's label smoothing (`ImageClassifier.label_smoothing`)."""

    label_smoothing: Rate = 0.0


@dataclass(kw_only=True)
class Extras:
    """The `extras` node (`conf/extras/default.yaml`)."""

    print_config: bool = True
    ignore_warnings: bool = True
    retain_freed_memory: bool = True


@dataclass(kw_only=True)
class Paths:
    """The `paths` node (`conf/paths/default.yaml`): folders, as strings."""

    root_dir: str
    data_dir: str
    log_dir: str
    output_dir: str
    work_dir: str
    ckpt_dir: str
