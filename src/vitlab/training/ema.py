"""`EMA`: an exponential moving average of the weights, validated and tested beside them.

`callbacks.ema.decay=0.9999` turns it on (`conf/callbacks/default.yaml`; null, the default,
keeps it off). After every optimizer step the average moves towards the weights the
optimizer has just made: `ema = decay_n * ema + (1 - decay_n) * weights`, where `decay_n`
(`ema_decay`) warms up from 0 as timm's `ModelEmaV3` does, so that the first updates do not
freeze the random init into the average. Validation and test then report the average's
accuracy and loss beside the weights' own (`val/acc_ema`, `test/acc_ema`), and every
checkpoint keeps both weight sets: `state_dict` the trained weights, `ema_state_dict` the
average, under the same keys. `src/eval.py ema=true`, `src/export.py ema=true` and
`src/predict.py ema=true` read the average instead of the weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Annotated, Any

import lightning as L
import torch
import torch.nn.functional as F
from annotated_types import Interval
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from vitlab.bounds import Count, Positive
from vitlab.errors import ConfigError

Decay = Annotated[float, Interval(gt=0, lt=1)]
"""An EMA decay: the weight of the old average in each update, strictly between 0 and 1."""

# The checkpoint keys: the average's weights (the keys of `state_dict`), and its counters.
EMA_STATE_DICT = "ema_state_dict"
EMA_STATE = "ema_state"
# Strategies whose parameters are shards: no rank holds the whole model to average.
SHARDING_STRATEGIES = (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)
HOW_TO_TRAIN_WITH_EMA = (
    "train with `callbacks.ema.decay=0.9999` (docs/training.md, EMA of the weights)"
)


def ema_decay(
    decay: float, num_updates: int, warmup: bool = True, warmup_power: float = 0.75
) -> float:
    """The decay of an EMA update after `num_updates` earlier ones: `min(decay, 1 - (1 + n) ** -p)`.

    The warm-up of timm's `ModelEmaV3.get_decay(step)` with `step = n + 1` (after @crowsonkb):
    with a high `decay` and no warm-up, the average stays close to the random init for
    thousands of steps, which timm's users found worse than no EMA. The first update (n = 0)
    copies the weights (decay 0) with or without warm-up, as `AveragedModel` does.
    `warmup_power` 3/4 reaches 0.999 after about 10k updates and 0.9999 after 215k
    (timm's note; 2/3 for runs of a million steps or more).
    """
    if num_updates <= 0:
        return 0.0
    if not warmup:
        return decay
    return min(decay, 1.0 - (1.0 + num_updates) ** -warmup_power)


def ema_state_dict(checkpoint: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The EMA weights of a loaded run checkpoint (`ImageClassifier` keys, `backbone.…`).

    `where` names the file for the message (`ckpt_path=<file>`). A checkpoint trained
    without EMA raises a `ConfigError` that says how to train one with it.
    """
    weights = checkpoint.get(EMA_STATE_DICT)
    if weights is None:
        raise ConfigError(
            f"ema=true but {where} holds no EMA weights (no {EMA_STATE_DICT!r}): its run "
            f"trained without EMA; {HOW_TO_TRAIN_WITH_EMA}, or leave ema=false"
        )
    return weights


class EMA(WeightAveraging):
    """Keep an exponential moving average of the weights; validate, test and checkpoint it beside them.

    Lightning's `WeightAveraging` supplies the average (a `torch.optim.swa_utils.AveragedModel`
    of the module, parameters and buffers) and its update after each optimizer step. Its
    other choices do not fit a run that must stay readable, and are overridden:
    - it swaps the average into the module for validation, so `val/acc` would silently
      become the average's and the monitored checkpoint would change meaning. Here `val/acc`
      stays the weights' and the average's is logged beside it as `val/acc_ema` and
      `val/loss_ema` (`test/...` likewise, in fit's test of the best checkpoint), so
      `callbacks.model_checkpoint.monitor=val/acc_ema` can pick checkpoints by it;
    - it writes the average into `checkpoint["state_dict"]`, so every tool reading a
      checkpoint would get other weights than those that trained. Here `state_dict` stays
      the trained weights, the average goes to `checkpoint["ema_state_dict"]` (same keys)
      and its counters to `checkpoint["ema_state"]`, and resuming continues it exactly;
    - it copies the average into the module when training ends; here the module keeps the
      trained weights (`src/eval.py ema=true` tests the average);
    - it builds the average on the module's device at `setup`, which is the CPU (Lightning
      moves the module later); here it moves with the module when fit starts, and stays
      float32 under a `*-true` precision (a bfloat16 average would round most updates away).

    The average's forward is never called: `compile=true` compiles the backbone in place,
    and a deep copy of a compiled module may still run the original's compiled code. The
    average's values are instead copied into the live module for the EMA forward, under
    `torch.no_grad` and the precision plugin's forward context, and the weights copied back
    (copies, not the base's swap, which would round the average to a lower-precision
    module's dtype). The counts behind `*_ema` (correct, loss sum, samples) are summed over
    ranks, so under DDP they are exact over all samples; the sanity-check validation is skipped.

    DDP keeps every rank's parameters equal, so every rank's average is the same, updated
    in step; only rank 0 writes checkpoints (Lightning). Sharding strategies (FSDP, model
    parallel, DeepSpeed) are refused: no rank holds the whole model to average. A checkpoint
    saved at a step boundary by a callback running before this one (`GracefulStop`,
    `CrashCheckpoint`) first gets that step's update, so it resumes exactly.

    `AveragedModel.update_parameters` reads its update count on the host (one device
    synchronisation per update, as the training step's finite-loss check already makes).

    Attributes:
        decay: the decay of the average per update (the weight of the old average), e.g.
            0.9999; None turns the callback off: it builds no copy and does nothing.
        warmup: warm the decay up from 0 (`ema_decay`); off, every update after the first
            uses `decay`.
        warmup_power: the warm-up's power p in `1 - (1 + n) ** -p`.
        update_every_n_steps: update after every n-th optimizer step; the decay and its
            warm-up count updates, not steps.
    """

    def __init__(
        self,
        decay: Decay | None = None,
        warmup: bool = True,
        warmup_power: Positive = 0.75,
        update_every_n_steps: Count = 1,
    ) -> None:
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(
                f"callbacks.ema.decay={decay!r} must be in (0, 1), e.g. 0.9999, or null (off)"
            )
        if not warmup_power > 0:
            raise ValueError(f"callbacks.ema.warmup_power={warmup_power!r} must be > 0")
        if update_every_n_steps < 1:
            raise ValueError(
                f"callbacks.ema.update_every_n_steps={update_every_n_steps!r} must be >= 1"
            )
        super().__init__(use_buffers=True, multi_avg_fn=self._lerp)
        self.decay = decay
        self.warmup = warmup
        self.warmup_power = warmup_power
        self.update_every_n_steps = update_every_n_steps
        # (correct, loss sum, samples) of the EMA over the current validation or test epoch.
        self._sums: torch.Tensor | None = None

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """After every `update_every_n_steps`-th optimizer step (`step_idx` counts from 0); never at an epoch's end."""
        return (
            self.decay is not None
            and step_idx is not None
            and (step_idx + 1) % self.update_every_n_steps == 0
        )

    @torch.no_grad()
    def _lerp(
        self, average: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor
    ) -> None:
        """`AveragedModel`'s `multi_avg_fn`: one `_foreach_lerp_` per device and dtype of the average."""
        assert self.decay is not None
        if not average[0].is_floating_point():  # e.g. BatchNorm's num_batches_tracked
            torch._foreach_copy_(average, current)
            return
        decay = ema_decay(self.decay, int(n_averaged), self.warmup, self.warmup_power)
        current = [t.to(average[0].dtype) for t in current]  # a `*-true` module's lower precision
        torch._foreach_lerp_(average, current, 1.0 - decay)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.decay is None:
            return
        if stage == "fit" and isinstance(trainer.strategy, SHARDING_STRATEGIES):
            raise ConfigError(
                f"callbacks.ema.decay={self.decay} needs the whole model on every rank, but "
                f"{type(trainer.strategy).__name__} shards it; use trainer=ddp, or "
                "callbacks.ema.decay=null"
            )
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None:
            self._average_model.to(pl_module.device)  # the device only: its dtype stays

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._update_if_due(trainer, pl_module)

    def _update_if_due(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The base's update: once per optimizer step that `should_update` picks."""
        if self._average_model is None or trainer.global_step <= self._latest_update_step:
            return
        if self.should_update(step_idx=trainer.global_step - 1):
            self._average_model.update_parameters(pl_module)
            self._latest_update_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing: the module keeps the trained weights (the base copies the average in)."""

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums = None

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._count(trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log("val", trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums = None

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._count(trainer, pl_module, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log("test", trainer, pl_module)

    def _count(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        """Add the EMA's (correct, loss sum, samples) on this `(images, labels)` batch."""
        if self._average_model is None or trainer.sanity_checking:
            return
        images, labels = batch
        with (
            torch.no_grad(),
            self._average_weights_in(pl_module),
            trainer.precision_plugin.forward_context(),
        ):
            logits = pl_module(images).float()
        label_smoothing = getattr(pl_module, "label_smoothing", 0.0)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="sum")
        # Mixup / CutMix labels are (b, num_classes) mixtures: accuracy counts their largest part.
        targets = labels.argmax(dim=-1) if labels.ndim == 2 else labels
        sums = torch.stack(
            [
                (logits.argmax(dim=-1) == targets).sum().double(),
                loss.double(),
                torch.tensor(targets.shape[0], dtype=torch.float64, device=logits.device),
            ]
        )
        self._sums = sums if self._sums is None else self._sums + sums

    def _log(self, split: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log `<split>/acc_ema` and `<split>/loss_ema` over every sample of every rank."""
        if self._average_model is None or trainer.sanity_checking:
            return
        sums = self._sums
        if sums is None:  # a rank without batches still joins the sum
            sums = torch.zeros(3, dtype=torch.float64, device=pl_module.device)
        correct, loss, total = trainer.strategy.reduce(sums, reduce_op="sum").tolist()
        self._sums = None
        if total == 0:
            return
        # Equal on every rank already: `max` over ranks keeps them exact and tells Lightning so.
        for name, value in (("acc_ema", correct / total), ("loss_ema", loss / total)):
            pl_module.log(f"{split}/{name}", value, on_epoch=True, sync_dist=True, reduce_fx="max")

    @contextmanager
    def _average_weights_in(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Run the block with the average's values in the module's own tensors, then put the weights back."""
        assert self._average_model is not None
        live = _tensors(pl_module)
        kept = [t.clone() for t in live]
        torch._foreach_copy_(live, _tensors(self._average_model.module))
        try:
            yield
        finally:
            torch._foreach_copy_(live, kept)

    def state_dict(self) -> dict[str, Any]:
        """Nothing: Lightning takes a callback's state before `on_save_checkpoint`, which may
        still update the average (class docstring); its state goes into `ema_state` there."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing: `on_load_checkpoint` restores the state from `ema_state`."""

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is None:
            return
        self._update_if_due(trainer, pl_module)  # a save at a step boundary, before our hook
        checkpoint[EMA_STATE_DICT] = self._average_model.module.state_dict()
        checkpoint[EMA_STATE] = {
            "n_averaged": int(self._average_model.n_averaged),
            "latest_update_step": self._latest_update_step,
        }

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Restore the average (resuming; or fit's test of the best checkpoint: its average)."""
        if self._average_model is None:
            return
        if EMA_STATE_DICT not in checkpoint:
            rank_zero_warn(
                "callbacks.ema: the checkpoint holds no EMA weights (it was trained without "
                "EMA); the average restarts from its weights"
            )
            self._average_model.module.load_state_dict(checkpoint["state_dict"])
            self._average_model.n_averaged.zero_()
            self._latest_update_step = 0
            return
        self._average_model.module.load_state_dict(checkpoint[EMA_STATE_DICT])
        state = checkpoint[EMA_STATE]
        self._average_model.n_averaged.fill_(state["n_averaged"])
        self._latest_update_step = state["latest_update_step"]


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """A module's parameters and buffers, in the order `AveragedModel(use_buffers=True)` pairs them."""
    return list(itertools.chain(module.parameters(), module.buffers()))
