"""Lightning callbacks vitlab configures by default (`conf/callbacks/default.yaml`)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


def images_in(batch: Any) -> int:
    """Number of images in an `(images, labels)` batch."""
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(images.shape[0]) if isinstance(images, torch.Tensor) else len(images)


class ImageThroughput(L.Callback):
    """Log training throughput, `train/samples_per_sec` (images per second, all devices), per epoch.

    Lightning's `ThroughputMonitor` writes straight to the loggers; this logs through
    the module instead, so the number also lands in `callback_metrics` and hence in
    `metrics.json`, where `src/compare.py` puts speed beside accuracy. It times the
    span between the end of the first training batch of an epoch and the end of its
    last (data loading included, validation excluded), skipping the first batch as warm-up.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._last = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._images = None, 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._last = time.perf_counter()
        if self._start is None:
            self._start = self._last
        else:
            self._images += images_in(batch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None or self._images == 0:
            return
        per_device = self._images / (self._last - self._start)
        pl_module.log("train/samples_per_sec", per_device * trainer.world_size, on_epoch=True)
