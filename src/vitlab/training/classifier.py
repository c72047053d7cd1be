"""`ImageClassifier`: the one LightningModule, wrapping any backbone that maps images to logits.

It owns the loss (cross-entropy, optional label smoothing), the metrics (top-1 and
top-5 through torchmetrics, per split) and the optimizer/scheduler wiring. Epoch
values are exact over all samples of all ranks: torchmetrics sums counts (and the
loss weighted by batch size) across processes, so a DDP validation or test, whose
ranks may hold shards of unequal size, reports what one process would. The
optimizer and scheduler arrive as factories (`functools.partial` or Hydra
`_partial_: true` nodes), so the module stays free of config code. Only plain
values are saved as hyperparameters: checkpoints load with `weights_only=True`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from vitlab.errors import NonFiniteLossError
from vitlab.models.flexi import draw_patch_size, state_dict_at_patch_size
from vitlab.training.ema import ema_state_dict
from vitlab.training.optim import build_optimizer, check_layer_decay

OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[..., LRScheduler]


class ImageClassifier(L.LightningModule):
    """Train, validate and test an image classifier.

    Attributes:
        backbone: `nn.Module` mapping (b, c, H, W) float images to (b, num_classes) logits.
        optimizer: factory called as `optimizer(param_groups)`; its `weight_decay`
            keyword (if any) is applied to weights only, never to biases, norms,
            position embeddings or the class token. None for evaluation only.
        scheduler: factory called as `scheduler(optimizer, total_steps=...)`, stepped
            every optimizer step; None for a constant learning rate.
        layer_decay: layer-wise learning-rate decay in (0, 1] (BEiT's and MAE's
            fine-tuning recipe, `optim.param_groups`): block i of depth trains at
            `layer_decay ** (depth - i)` times the optimizer's `lr`, the head at `lr`,
            the embeddings at `layer_decay ** (depth + 1)`; the backbone must have
            `blocks`. None: one learning rate.
        num_classes: number of classes (for the metrics).
        label_smoothing: cross-entropy label smoothing in [0, 1).
        class_names: the name of each label, in label order (the datamodule's
            `class_names`), or None. Saved with the hyperparameters as a list of str,
            so a checkpoint can name its predictions; must have num_classes entries.
        config: the run's resolved config as plain data. It is saved with the
            hyperparameters, so a checkpoint alone rebuilds its model (`src/eval.py`)
            and every logger records the whole config.
        ema_weights: load a checkpoint's EMA weights (`ema_state_dict`, `vitlab.training.ema`)
            in place of its trained ones; `src/eval.py ema=true` sets it. Not a constructor
            argument: it says how to load, not what the model is, so it is not saved.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        config: dict[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
        layer_decay: float | None = None,
    ) -> None:
        super().__init__()
        if layer_decay is not None:
            check_layer_decay(backbone, layer_decay)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        if class_names is not None:
            class_names = list(class_names)  # plain data: saved below, loads with weights_only
            if len(class_names) != num_classes:
                raise ValueError(
                    f"class_names has {len(class_names)} names but num_classes={num_classes}; "
                    "give one name per class"
                )
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.layer_decay = layer_decay
        self.label_smoothing = label_smoothing
        self.ema_weights = False
        top_k = min(5, num_classes)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                f"acc_top{top_k}": MulticlassAccuracy(num_classes, top_k=top_k, average="micro"),
            }
        )
        # One collection per split; `nn.ModuleDict` cannot hold a key named "train".
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # The mean loss over every sample of every rank (`self.log` of a tensor would average
        # the ranks' means). Fed per-sample losses: "disable" keeps a NaN a NaN (the default
        # drops it with a warning) and, in torchmetrics 1.x, also ignores any weights.
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.test_loss = MeanMetric(nan_strategy="disable")

    def forward(self, images: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        """Logits of the backbone; `patch_size` (FlexiViT backbones only) runs it at that size."""
        if patch_size is None:
            return self.backbone(images)
        return self.backbone(images, patch_size=patch_size)

    def _loss_and_log_metrics(
        self,
        batch: tuple[torch.Tensor, torch.Tensor],
        split: str,
        patch_size: int | None = None,
        logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The batch's mean loss; updates and logs the split's loss and accuracy. `logits`: the
        batch's, if the caller has run the forward already."""
        images, labels = batch
        logits = self(images, patch_size) if logits is None else logits
        losses = F.cross_entropy(
            logits.float(), labels, label_smoothing=self.label_smoothing, reduction="none"
        )
        loss = losses.mean()
        metrics = getattr(self, f"{split}_metrics")
        # Mixup / CutMix labels are (b, num_classes) mixtures: accuracy counts their largest part.
        metrics.update(logits.detach(), labels.argmax(dim=-1) if labels.ndim == 2 else labels)
        mean_loss = getattr(self, f"{split}_loss")
        mean_loss(losses.detach())  # forward: the step value is this batch's mean
        self.log(f"{split}/loss", mean_loss, on_step=split == "train", on_epoch=True, prog_bar=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        loss = self._loss_and_log_metrics(batch, "train", self._training_patch_size())
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the training loss is {loss.item()} at step {self.global_step} "
                f"(epoch {self.current_epoch}); usual causes: a learning rate too high "
                "(optimizer.lr), float16 without loss scaling (trainer.precision=16-true; "
                "use 16-mixed or bf16-mixed), or NaN/Inf in the data. "
                "The checkpoints written before this step are kept."
            )
        return loss

    def _training_patch_size(self) -> int | None:
        """FlexiViT: this step's patch size, drawn from the backbone's `flexi_patch_sizes`
        (`flexi.draw_patch_size`) by the run's seed and the step, and logged; None when off.

        The optimizer step, not the batch, is counted: gradient accumulation keeps one
        size per update, and every rank and a resumed run draw the same sizes. Validation
        and test run at the stored patch size.
        """
        sizes = getattr(self.backbone, "flexi_patch_sizes", None)
        if not sizes:
            return None
        seed = (self.hparams.get("config") or {}).get("seed") or 0
        size = draw_patch_size(sizes, seed, self.global_step)
        self.log("train/patch_size", float(size), on_step=True, on_epoch=False)
        return size

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A ViT checkpoint of another patch size than the built backbone's loads into it:
        the kernel PI-resized and the learned table resized as FlexiViT does
        (`flexi.state_dict_at_patch_size`), so `src/eval.py ckpt_path=... +model.patch_size=8`
        evaluates any ViT checkpoint at patch 8. Lightning calls this before it loads the
        state dict; a checkpoint at the backbone's own patch size is left alone. With
        `ema_weights`, the checkpoint's EMA weights replace its trained ones first.
        """
        if self.ema_weights:
            checkpoint["state_dict"] = ema_state_dict(checkpoint, "the loaded checkpoint")
        checkpoint["state_dict"] = state_dict_at_patch_size(
            checkpoint["state_dict"], self.backbone, prefix="backbone."
        )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._loss_and_log_metrics(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The batch's logits, for callbacks that look at each prediction (`PerClassResults`)."""
        logits = self(batch[0])
        self._loss_and_log_metrics(batch, "test", logits=logits)
        return logits.detach()

    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_factory is None:
            raise ValueError(
                "ImageClassifier was built without an optimizer; pass `optimizer=` to train it"
            )
        optimizer = build_optimizer(self.optimizer_factory, self.backbone, self.layer_decay)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(
            optimizer, total_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
