"""The export check: an exported model run beside the PyTorch model on the same images.

The images are the first of the checkpoint's own test split, read by its datamodule
as `src/eval.py` reads them, so the accuracies are the run's; a model without a data
config (an official or timm file), or whose data is not on this machine, is fed
seeded uniform noise in [-1, 1] of its input shape: the logits can still be compared,
though no accuracy exists.

Each model is a `Runner`, images (b, c, h, w) -> logits (b, classes), on the CPU. Against
the reference (the PyTorch model, float32) each gets the largest absolute logit
difference, the share of images whose top-1 class is the same, its accuracy where
there are labels, its size on disk and the median time of a batch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from vitlab.deploy.preprocess import Preprocess
from vitlab.errors import VitlabError

Runner = Callable[[torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor | None]
# Images checked when a model has no test split and `check_images` is null.
SYNTHETIC_IMAGES = 256


@dataclass(frozen=True)
class CheckImages:
    """The batches the check runs, and where they came from (for the report)."""

    batches: list[Batch]
    description: str

    @property
    def count(self) -> int:
        return sum(images.shape[0] for images, _ in self.batches)

    @property
    def labelled(self) -> bool:
        return all(labels is not None for _, labels in self.batches)


def check_images(
    data_config: Mapping[str, Any] | None,
    preprocess: Preprocess,
    count: int | None,
    batch_size: int,
    seed: int,
) -> CheckImages:
    """The first `count` images (None: all) of the data config's test split, in batches;
    or, with no data config or no readable data, `count` seeded synthetic images."""
    if data_config is not None and "_target_" in data_config:
        from vitlab.runs.build import instantiate

        try:
            data = instantiate({**data_config, "batch_size": batch_size}, "data")
            data.setup("test")
            return CheckImages(
                _first(data.test_dataloader(), count),
                f"the test split of {data_config['_target_']}",
            )
        except (VitlabError, OSError) as err:
            reason = f"its test split is not readable here: {err}"
    else:
        reason = "no test split comes with the file"
    number = count or SYNTHETIC_IMAGES
    generator = torch.Generator().manual_seed(seed)
    side = preprocess.image_size[0]
    images = torch.rand(number, preprocess.num_channels, side, side, generator=generator) * 2 - 1
    batches = [(chunk, None) for chunk in images.split(batch_size)]
    return CheckImages(batches, f"synthetic images in [-1, 1] ({reason})")


def _first(loader: Any, count: int | None) -> list[Batch]:
    batches, taken = [], 0
    for images, labels in loader:
        if count is not None:
            images, labels = images[: count - taken], labels[: count - taken]
        batches.append((images, labels))
        taken += images.shape[0]
        if count is not None and taken >= count:
            break
    return batches


def torch_runner(model: nn.Module) -> Runner:
    """`model` in eval mode under `torch.inference_mode`, as a deployment runs it."""
    model.eval()

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(images)

    return run


@dataclass(frozen=True)
class Candidate:
    """A model the check runs: its name in the table, its `Runner`, its size on disk in bytes."""

    name: str
    run: Runner
    size_bytes: int


@dataclass
class Measured:
    """One model's numbers against the reference (`compare`).

    Attributes:
        name: the model as the table names it.
        size_bytes: its file's size (or its serialized state dict's).
        max_abs_diff: the largest |logit - reference logit| over every image and class.
        agreement: the share of images whose top-1 class is the reference's.
        accuracy: top-1 accuracy; None without labels.
        latency_s: median seconds for the first batch (`time_batches`).
    """

    name: str
    size_bytes: int
    max_abs_diff: float
    agreement: float
    accuracy: float | None
    latency_s: float


def compare(
    reference: Candidate, others: list[Candidate], images: CheckImages, latency_batches: int
) -> dict[str, Measured]:
    """Run every model on every batch, then time each on the first batch (`time_batches`,
    `latency_batches` times): the reference's numbers first, then each other's."""
    candidates = [reference, *others]
    worst = dict.fromkeys((c.name for c in candidates), 0.0)
    agreed = dict.fromkeys(worst, 0)
    correct = dict.fromkeys(worst, 0)
    for batch, labels in images.batches:
        expected = reference.run(batch).float()
        for candidate in candidates:
            logits = expected if candidate is reference else candidate.run(batch).float()
            name = candidate.name
            worst[name] = max(worst[name], float((logits - expected).abs().max()))
            agreed[name] += int((logits.argmax(-1) == expected.argmax(-1)).sum())
            if labels is not None:
                correct[name] += int((logits.argmax(-1) == labels).sum())
    return {
        c.name: Measured(
            c.name,
            c.size_bytes,
            worst[c.name],
            agreed[c.name] / images.count,
            correct[c.name] / images.count if images.labelled else None,
            time_batches(c.run, images.batches[0][0], latency_batches),
        )
        for c in candidates
    }


def time_batches(run: Runner, batch: torch.Tensor, batches: int) -> float:
    """Median seconds of `run(batch)` over `batches` calls, after one untimed call."""
    run(batch)
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(measured: Mapping[str, Measured], images: CheckImages) -> None:
    """The check as a table: one row per model, the reference first."""
    reference = next(iter(measured.values()))
    table = Table(
        title=f"Export check, {images.count} images: {images.description}",
        title_justify="left",
    )
    for column in ("model", "max |Δ logit|", "top-1 agreement", "accuracy", "Δ accuracy"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_column("size (MB)", justify="right")
    table.add_column(f"ms / batch of {images.batches[0][0].shape[0]}", justify="right")
    for m in measured.values():
        change = (
            "—"
            if m is reference or m.accuracy is None or reference.accuracy is None
            else f"{(m.accuracy - reference.accuracy) * 100:+.2f} pt"
        )
        table.add_row(
            m.name,
            "—" if m is reference else f"{m.max_abs_diff:.2e}",
            "—" if m is reference else f"{m.agreement:.2%}",
            "—" if m.accuracy is None else f"{m.accuracy:.2%}",
            change,
            f"{m.size_bytes / 1e6:.2f}",
            f"{m.latency_s * 1e3:.2f}",
        )
    Console(width=max(120, Console().width)).print(table)
