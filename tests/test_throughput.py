"""`ImageThroughput`: images per second and MFU, logged per epoch, on by default."""

from __future__ import annotations

import json
import math
from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import tiny_vit
from vitlab.runs.tasks import train
from vitlab.training.callbacks import ImageThroughput
from vitlab.training.classifier import ImageClassifier
from vitlab.training.flops import count_flops

QUICK = ("trainer.max_epochs=1", "trainer.limit_train_batches=3", "scheduler.warmup_steps=1")
IMAGES = TensorDataset(torch.randn(24, 3, 16, 16), torch.randint(10, (24,)))


def fit(backbone: nn.Module, callback: ImageThroughput) -> dict[str, float]:
    """Three batches of 8 through a plain Trainer; the logged epoch metrics."""
    model = ImageClassifier(backbone, num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.01))
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(IMAGES, batch_size=8))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_mfu_is_throughput_times_flops_per_image_over_the_peak():
    callback = ImageThroughput(peak_flops=1e12)
    metrics = fit(tiny_vit(), callback)
    flops = count_flops(ImageClassifier(tiny_vit(), num_classes=10), (1, 3, 16, 16))
    assert callback.flops_per_sample == flops
    expected = metrics["train/samples_per_sec"] * flops / 1e12
    assert metrics["train/mfu"] == pytest.approx(expected, rel=1e-5)


def test_without_a_peak_the_peak_is_measured():
    callback = ImageThroughput()
    metrics = fit(tiny_vit(), callback)
    assert callback.peak_flops > 0
    assert metrics["train/mfu"] > 0


class ReadsItsInput(nn.Module):
    """A backbone whose forward reads a value from the data: no meta-device count."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 16 * 16, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(images.flatten(1)) * float(images.abs().max().item() > 0)


def test_a_module_whose_flops_cannot_be_counted_trains_on_without_mfu():
    with pytest.warns(UserWarning, match="logs no train/mfu"):
        metrics = fit(ReadsItsInput(), ImageThroughput())
    assert "train/mfu" not in metrics
    assert metrics["train/samples_per_sec"] > 0


def test_mfu_off_logs_throughput_alone():
    callback = ImageThroughput(mfu=False)
    metrics = fit(tiny_vit(), callback)
    assert "train/mfu" not in metrics
    assert callback.flops_per_sample is None


def test_a_non_positive_peak_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"callbacks.throughput.peak_flops=0"):
        ImageThroughput(peak_flops=0)


def test_the_default_run_writes_mfu_into_metrics_json(make_cfg, tmp_path):
    train(make_cfg(*QUICK, "test=false"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train/samples_per_sec"] > 0
    assert math.isfinite(metrics["train/mfu"]) and metrics["train/mfu"] > 0
