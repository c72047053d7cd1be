"""Refusals that need the whole config: precision and accelerator, NaN losses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitlab.errors import ConfigError, NonFiniteLossError
from vitlab.runs.tasks import train
from vitlab.runs.validate import check_trainer
from vitlab.training.classifier import ImageClassifier


def test_float16_mixed_precision_on_the_cpu_is_refused_with_the_valid_choices():
    with pytest.raises(
        ConfigError, match=r"trainer.precision=16-mixed needs a CUDA GPU.*32-true, bf16-mixed"
    ):
        check_trainer({"accelerator": "cpu", "precision": "16-mixed"})


def test_auto_accelerator_without_a_gpu_is_the_cpu_for_the_precision_check():
    with pytest.raises(ConfigError, match="16-mixed"):
        check_trainer({"accelerator": "auto", "precision": "16-mixed"}, gpu_available=False)


def test_cpu_precisions_of_the_sweep_are_accepted():
    for precision in ("32-true", "bf16-mixed"):
        check_trainer({"accelerator": "cpu", "precision": precision})


def test_gpu_trainer_without_a_gpu_suggests_trainer_cpu():
    with pytest.raises(ConfigError, match="no CUDA GPU; use trainer=cpu"):
        check_trainer({"accelerator": "gpu", "precision": "32-true"}, gpu_available=False)


def test_training_with_16_mixed_on_cpu_stops_before_training(make_cfg):
    with pytest.raises(ConfigError, match="16-mixed"):
        train(make_cfg("trainer=cpu", "trainer.precision=16-mixed"))


def test_unknown_precision_lists_lightnings_choices(make_cfg):
    with pytest.raises(ConfigError, match=r"(?s)trainer.*fp8.*bf16-mixed"):
        train(make_cfg("trainer.precision=fp8", "debug=fdr"))


class _NaNBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 10), float("nan")) * self.weight


def test_nan_loss_stops_training_naming_the_step_and_the_usual_causes():
    module = ImageClassifier(_NaNBackbone(), num_classes=10)
    batch = (torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(
        NonFiniteLossError, match=r"(?s)nan at step 0.*learning rate.*float16.*data"
    ):
        module.training_step(batch, 0)
