"""Lightning callbacks vitlab configures (`conf/callbacks/default.yaml` for training, `eval.yaml`).

`ImageThroughput` logs speed beside accuracy; `RNGState` makes a resumed run draw the
random numbers the uninterrupted one would have. `GracefulStop` has a module of its
own, `vitlab.training.signals`.
"""

from __future__ import annotations

import random
import time
from typing import Any, Literal, get_args

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size

from vitlab.bounds import Positive
from vitlab.training.flops import cached_peak_flops, count_flops, precision_dtype

# The loops `ImageThroughput` can time, each named as its metrics are (`train/...`, `test/...`).
Stage = Literal["train", "test"]


class ImageThroughput(L.Callback):
    """Log the throughput of one loop, `<stage>/samples_per_sec` (images per second, all
    devices), and its model FLOP utilisation, `<stage>/mfu` (achieved / peak FLOP/s), per epoch.

    The loop is training (`stage="train"`, `conf/callbacks/default.yaml`) or testing
    (`stage="test"`, `conf/callbacks/eval.yaml`, so that `src/eval.py` reports the speed of the
    model it tests, e.g. at another patch size). Lightning's `ThroughputMonitor` writes straight
    to the loggers; this logs through the module instead, so the numbers also land in
    `callback_metrics` and hence in `metrics.json`, where `src/compare.py` puts speed beside
    accuracy. It times the span between the end of the first batch of an epoch and the end
    of its last (data loading included, validation excluded), skipping the first batch as warm-up.

    MFU = samples/s x FLOPs per sample / (peak FLOP/s x devices). The FLOPs of a step
    (training: forward, loss, backward; testing: the forward; `vitlab.training.flops.count_flops`)
    are counted once, on the meta device, from the first batch's shape: no arithmetic, no effect
    on the run. The peak is `peak_flops` if given, else measured once per process
    with a large matmul in the run's compute dtype (`vitlab.training.flops.cached_peak_flops`).
    A module whose FLOPs cannot be counted, or a precision with no single dtype, logs
    no MFU (with a warning) and runs on.

    Attributes:
        mfu: log `<stage>/mfu` as well as `<stage>/samples_per_sec`.
        peak_flops: the device's peak FLOP/s in the compute dtype (e.g. 989e12 for an
            H100's dense bf16), or None to measure it.
        stage: the loop timed, `train` or `test`.
    """

    def __init__(
        self, mfu: bool = True, peak_flops: Positive | None = None, stage: Stage = "train"
    ) -> None:
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"callbacks.throughput.peak_flops={peak_flops!r} must be > 0 or null")
        if stage not in get_args(Stage):
            raise ValueError(
                f"callbacks.throughput.stage={stage!r}: use one of {', '.join(get_args(Stage))}"
            )
        self.mfu = mfu
        self.peak_flops = peak_flops
        self.stage = stage
        self.flops_per_sample: int | None = None
        self._start: float | None = None
        self._last = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start("train")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start("train", trainer, pl_module, batch)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._batch_end("train", batch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_end("train", trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start("test")

    def on_test_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_start("test", trainer, pl_module, batch)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end("test", batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_end("test", trainer, pl_module)

    def _epoch_start(self, stage: Stage) -> None:
        if stage == self.stage:
            self._start, self._images = None, 0

    def _batch_start(
        self, stage: Stage, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any
    ) -> None:
        if stage == self.stage and self.mfu and self.flops_per_sample is None:
            self._count_flops_per_sample(trainer, pl_module, batch)

    def _batch_end(self, stage: Stage, batch: Any) -> None:
        if stage != self.stage:
            return
        self._last = time.perf_counter()
        if self._start is None:
            self._start = self._last
        else:
            self._images += extract_batch_size(batch)

    def _epoch_end(self, stage: Stage, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if stage != self.stage or self._start is None or self._images == 0:
            return
        per_device = self._images / (self._last - self._start)
        pl_module.log(f"{stage}/samples_per_sec", per_device * trainer.world_size, on_epoch=True)
        if self.mfu and self.flops_per_sample and self.peak_flops:
            mfu = per_device * self.flops_per_sample / self.peak_flops
            pl_module.log(f"{stage}/mfu", mfu, on_epoch=True)

    def _count_flops_per_sample(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any
    ) -> None:
        """Set the FLOPs per sample of a step, and the peak if not given; else turn MFU off."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        try:
            train = self.stage == "train"
            self.flops_per_sample = count_flops(pl_module, (1, *images.shape[1:]), train=train)
            if self.peak_flops is None:
                dtype = precision_dtype(trainer.precision)
                self.peak_flops = cached_peak_flops(pl_module.device, dtype)
        except Exception as err:  # any module, any precision plugin: MFU is a nicety
            rank_zero_warn(f"ImageThroughput logs no {self.stage}/mfu: {type(err).__name__}: {err}")
            self.mfu = False


class RNGState(L.Callback):
    """Save the global RNG states in every checkpoint; restore them when training resumes.

    Between a training step and the checkpoint written after it nothing draws from
    the global RNG: validation runs in eval mode, and vitlab's loaders draw order
    and augmentation from their own seeds (`vitlab.data.samplers`). So the states at
    saving time are those the next step would have used. They are stored as plain
    tensors and lists, so checkpoints still load with `weights_only=True`; that is why
    this is not Lightning's (private) `_collect_rng_states`, whose numpy state is an array.
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["rng_state"] = global_rng_states()

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._to_restore = checkpoint.get("rng_state")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._to_restore is not None:
            set_global_rng_states(self._to_restore)
            self._to_restore = None


def global_rng_states() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_initialized():  # implies is_available(), and costs far less per step
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
