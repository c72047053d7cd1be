"""`ImageDataModule`: what every vitlab datamodule shares.

A subclass only builds `train_set`, `val_set` and `test_set` in `setup()`; this
class turns them into DataLoaders. `batch_size` is the global batch, as in the
paper's recipes: each device loads `batch_size / (world_size * accumulate_grad_batches)`,
so the same config trains the same way on 1 or 64 devices. Val and test loaders
keep every sample exactly once over all ranks (sequential, no padding, no dropped
remainder); the train loader shuffles and drops the last partial batch, as the
original does. The samplers are ours (`vitlab.data.samplers`), not the ones
Lightning would inject (trainer `use_distributed_sampler: false`): they make the
order and the augmentation reproducible and resumable mid-epoch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, SequentialSampler, default_collate

from vitlab.bounds import Count, NonNegative, NonNegativeInt, Size
from vitlab.data.folds import NumFolds, fold_problem
from vitlab.data.samplers import (
    EpochShuffleSampler,
    ResumableDataLoader,
    SeededDataset,
    ShardSampler,
    seeded_collate,
)
from vitlab.data.transforms import MixupCutmix, eval_transform, train_transform
from vitlab.errors import ConfigError


def _collate_then(
    samples: list[Any], collate_fn: Callable[[list[Any]], Any], then: Callable[[Any], Any]
) -> Any:
    return then(collate_fn(samples))


def _require_positive_int(key: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"data.{key}={value!r} must be a positive integer")


def batch_split_problem(batch_size: int, world_size: int, accumulate: int) -> str | None:
    """Why the global `batch_size` cannot split into world_size x accumulate micro-batches, or None."""
    parts = world_size * accumulate
    if batch_size % parts == 0:
        return None
    lower = batch_size // parts * parts
    divide = f"{lower} or {lower + parts}" if lower else f"{lower + parts}"
    return (
        f"data.batch_size={batch_size} is the global batch and must split evenly into "
        f"world size {world_size} (trainer.devices x trainer.num_nodes) x "
        f"trainer.accumulate_grad_batches={accumulate} = {parts} micro-batches; "
        f"use a multiple of {parts} (e.g. {divide}) or change the devices/accumulation"
    )


@dataclass(eq=False, repr=False, kw_only=True)
class ImageDataModule(LightningDataModule):
    """Base for image-classification datamodules yielding `(images, labels)` batches.

    Images are float32 (b, num_channels, image_size, image_size) in [-1, 1]; labels
    int64 in [0, num_classes). Datamodules are dataclasses: their fields are their
    keyword-only constructor arguments, the keys of `conf/data/*.yaml`. The fields
    every datamodule shares are declared once, here; a subclass redeclares one only
    to give it that dataset's default, adds its own, and checks them in a
    `__post_init__` that calls this one.

    Attributes:
        data_dir: where the dataset lives on disk, resolved to an absolute `Path`
            (unused by in-memory datasets, kept so that every data config has the same fields).
        batch_size: the global batch: summed over devices and gradient-accumulation steps.
        num_workers: DataLoader worker processes per device; 0 loads in the main process.
        image_size: side of the square images the model sees, in pixels.
        num_channels: image channels (3 for RGB, 1 for grey).
        num_classes: number of labels. Only a datamodule that reads its classes from the
            disk (one with a `find_classes` static method) may leave it None until `setup`.
        pin_memory: page-lock batches for faster host-to-GPU copies (GPU runs only).
        mixup_alpha, cutmix_alpha: Mixup / CutMix of training batches (`MixupCutmix`),
            which then carry (b, num_classes) soft labels; 0.0 (off) by default.
        num_folds, fold: stratified k-fold cross-validation (`vitlab.data.folds`): the
            training pool (every image outside the test set) is cut into `num_folds`
            folds, fold `fold` validates and the others train; the test set does not
            change. None (the default) keeps the dataset's usual validation split.
        split_seed: seed of every split the datamodule draws (the folds; digits' val and
            test), independent of the run's seed, so every run sees the same split.
    """

    data_dir: str = "data/"
    batch_size: Count
    num_workers: NonNegativeInt = 0
    image_size: Size
    num_channels: Count
    num_classes: Count | None
    pin_memory: bool = False
    mixup_alpha: NonNegative = 0.0
    cutmix_alpha: NonNegative = 0.0
    num_folds: NumFolds | None = None
    fold: NonNegativeInt = 0
    split_seed: NonNegativeInt = 0

    # Built by the subclass's `setup()`.
    train_set: Dataset = field(init=False)
    val_set: Dataset = field(init=False)
    test_set: Dataset = field(init=False)

    def __post_init__(self) -> None:
        super().__init__()
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(
                f"data.num_workers={self.num_workers!r} must be 0 or a positive integer"
            )
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        for key in ("batch_size", "image_size", "num_channels"):
            _require_positive_int(key, getattr(self, key))
        if self.num_classes is not None or not hasattr(self, "find_classes"):
            _require_positive_int("num_classes", self.num_classes)
        for key in ("mixup_alpha", "cutmix_alpha"):
            alpha = getattr(self, key)
            if not (isinstance(alpha, (int, float)) and alpha >= 0):
                raise ConfigError(f"data.{key}={alpha!r} must be a number >= 0 (0 turns it off)")
        if problem := fold_problem(self.num_folds, self.fold):
            raise ConfigError(problem)
        self._resume_state: dict[str, int] | None = None

    @property
    def class_names(self) -> list[str] | None:
        """The name of each label, in label order; None: the dataset has no names.

        The classifier saves them with its hyperparameters, so a checkpoint can name
        its predictions.
        """
        return None

    @property
    def per_device_batch_size(self) -> int:
        """The DataLoader batch: global batch / (world size x accumulate_grad_batches).

        Read from the attached trainer; without one, the global batch itself.
        """
        attached = self.trainer is not None
        world_size = self.trainer.world_size if attached else 1
        accumulate = self.trainer.accumulate_grad_batches if attached else 1
        problem = batch_split_problem(self.batch_size, world_size, accumulate)
        if problem:
            raise ConfigError(problem)
        parts = world_size * accumulate
        return self.batch_size // parts

    def train_dataloader(self) -> DataLoader:
        return self._dataloader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._dataloader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._dataloader(self.test_set, train=False)

    def _dataloader(
        self,
        dataset: Dataset,
        train: bool,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> DataLoader:
        batch_size = self.per_device_batch_size
        if train and len(dataset) < self.batch_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is larger than the {len(dataset)} training "
                f"samples, so no full batch exists; use data.batch_size <= {len(dataset)}"
            )
        rank = getattr(self.trainer, "global_rank", 0)
        world_size = getattr(self.trainer, "world_size", 1)
        common = {
            "batch_size": batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
            # Worker base seeds come from here, not from the global RNG.
            "generator": torch.Generator().manual_seed(self.shuffle_seed),
        }
        if getattr(self.trainer, "overfit_batches", 0):
            # `debug=overfit`: the same first batches every epoch. Lightning swaps in a
            # SequentialSampler for any other sampler, which our seeded samples cannot take.
            sampler = SequentialSampler(dataset)
            collate_fn = self._with_mixing(collate_fn) if train else collate_fn
            return DataLoader(
                dataset, sampler=sampler, drop_last=train, collate_fn=collate_fn, **common
            )
        if not train:
            _check_every_rank_has_samples(dataset, world_size, self._split_name(dataset))
            sampler = ShardSampler(len(dataset), rank, world_size)
            return DataLoader(dataset, sampler=sampler, collate_fn=collate_fn, **common)
        loader = ResumableDataLoader(
            SeededDataset(dataset),
            sampler=EpochShuffleSampler(len(dataset), self.shuffle_seed, rank, world_size),
            drop_last=True,
            collate_fn=partial(seeded_collate, collate_fn=self._with_mixing(collate_fn)),
            current_epoch=lambda: getattr(self.trainer, "current_epoch", 0),
            trained_batches=self._trained_batches,
            **common,
        )
        if self._resume_state is not None:
            loader.load_state_dict(self._resume_state)
        return loader

    def _split_name(self, dataset: Dataset) -> str:
        return "validation" if dataset is getattr(self, "val_set", None) else "test"

    def _with_mixing(
        self, collate_fn: Callable[[list[Any]], Any] | None
    ) -> Callable[[list[Any]], Any] | None:
        """`collate_fn` followed by Mixup / CutMix when they are on.

        Built here, with the training loader, not at construction: by then `setup` has
        set `num_classes` (the soft labels' length) for a datamodule that counts its classes.
        """
        if not (self.mixup_alpha or self.cutmix_alpha):
            return collate_fn
        mix = MixupCutmix(self.num_classes, self.mixup_alpha, self.cutmix_alpha)
        return partial(_collate_then, collate_fn=collate_fn or default_collate, then=mix)

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position, saved by Lightning in every checkpoint."""
        loader = self.trainer.train_dataloader if self.trainer is not None else None
        return (
            {"train_loader": loader.state_dict()} if isinstance(loader, ResumableDataLoader) else {}
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called on resume before the loaders are built: the training loader starts there."""
        self._resume_state = state_dict.get("train_loader")

    @property
    def shuffle_seed(self) -> int:
        """The data-order seed: the run's seed (Lightning's `seed_everything` exports it
        as PL_GLOBAL_SEED to every rank), else 0, so that all ranks agree."""
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _trained_batches(self) -> int:
        """Batches of the current epoch that finished their training step."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed


@dataclass(eq=False, repr=False, kw_only=True)
class InceptionCropDataModule(ImageDataModule):
    """Base for datasets of decoded images preprocessed as the original ViT does.

    Training images get the inception crop, a random flip and optionally RandAugment
    (`train_transform`); evaluation images a plain resize (`eval_transform`). A
    subclass builds its splits with `train_transform` and `eval_transform`. The
    defaults are the paper's fine-tuning setup, on GPUs.

    Attributes (beyond `ImageDataModule`'s):
        train_crop_scale: (min, max) fraction of the image area a training crop covers.
        train_crop_ratio: (min, max) aspect ratio of a training crop.
        hflip: random horizontal flips in training.
        randaugment: (num_ops, magnitude) of RandAugment in training, or None (the original).
    """

    batch_size: Count = 512
    num_workers: NonNegativeInt = 8
    image_size: Size = 224
    num_channels: Count = 3
    pin_memory: bool = True
    train_crop_scale: Sequence[float] = (0.05, 1.0)
    train_crop_ratio: Sequence[float] = (3 / 4, 4 / 3)
    hflip: bool = True
    randaugment: Sequence[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.train_transform = train_transform(
            self.image_size,
            self.num_channels,
            self.train_crop_scale,
            self.train_crop_ratio,
            self.hflip,
            self.randaugment,
        )
        self.eval_transform = eval_transform(self.image_size, self.num_channels)


def _check_every_rank_has_samples(dataset: Dataset, world_size: int, split: str) -> None:
    """An unpadded shard (`ShardSampler`) is empty on the ranks past the last sample: Lightning
    stops such a rank ("DataLoader within local rank has zero length"), and the others fail
    on the lost connection. Every rank refuses it here instead, with the same message."""
    size = len(dataset)  # type: ignore[arg-type]
    if 0 < size < world_size:
        samples, devices = (
            "sample" if size == 1 else "samples",
            "device" if size == 1 else "devices",
        )
        raise ConfigError(
            f"the {split} set has {size} {samples}, fewer than the {world_size} ranks (devices x "
            f"nodes), so some ranks would have none to evaluate; use at most {size} {devices}, "
            f"or more {split} samples"
        )
