"""Lightning callbacks vitlab configures by default (`conf/callbacks/default.yaml`)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from vitlab.training.flops import cached_peak_flops, count_flops, precision_dtype


def images_in(batch: Any) -> int:
    """Number of images in an `(images, labels)` batch."""
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(images.shape[0]) if isinstance(images, torch.Tensor) else len(images)


class ImageThroughput(L.Callback):
    """Log training throughput, `train/samples_per_sec` (images per second, all devices),
    and model FLOP utilisation, `train/mfu` (achieved / peak FLOP/s), per epoch.

    Lightning's `ThroughputMonitor` writes straight to the loggers; this logs through
    the module instead, so the numbers also land in `callback_metrics` and hence in
    `metrics.json`, where `src/compare.py` puts speed beside accuracy. It times the
    span between the end of the first training batch of an epoch and the end of its
    last (data loading included, validation excluded), skipping the first batch as warm-up.

    MFU = samples/s x FLOPs per sample / (peak FLOP/s x devices). The FLOPs of a
    training step (forward, loss, backward; `vitlab.training.flops.count_flops`) are counted
    once, on the meta device, from the first batch's shape: no arithmetic, no effect
    on the run. The peak is `peak_flops` if given, else measured once per process
    with a large matmul in the run's compute dtype (`vitlab.training.flops.cached_peak_flops`,
    about half a second on a CPU). A module whose FLOPs cannot be counted, or a
    precision with no single dtype, logs no MFU (with a warning) and trains on.

    Attributes:
        mfu: log `train/mfu` as well as `train/samples_per_sec`.
        peak_flops: the device's peak FLOP/s in the compute dtype (e.g. 989e12 for an
            H100's dense bf16), or None to measure it.
    """

    def __init__(self, mfu: bool = True, peak_flops: float | None = None) -> None:
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"callbacks.throughput.peak_flops={peak_flops!r} must be > 0 or null")
        self.mfu = mfu
        self.peak_flops = peak_flops
        self.flops_per_sample: int | None = None
        self._start: float | None = None
        self._last = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._images = None, 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.mfu and self.flops_per_sample is None:
            self._count(trainer, pl_module, batch)

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
        if self.mfu and self.flops_per_sample and self.peak_flops:
            mfu = per_device * self.flops_per_sample / self.peak_flops
            pl_module.log("train/mfu", mfu, on_epoch=True)

    def _count(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        """Set the FLOPs per sample of a training step, and the peak if not given; else turn MFU off."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        try:
            self.flops_per_sample = count_flops(pl_module, (1, *images.shape[1:]), train=True)
            if self.peak_flops is None:
                dtype = precision_dtype(trainer.precision)
                self.peak_flops = cached_peak_flops(pl_module.device, dtype)
        except Exception as err:  # any module, any precision plugin: MFU is a nicety
            rank_zero_warn(f"ImageThroughput logs no train/mfu: {type(err).__name__}: {err}")
            self.mfu = False
