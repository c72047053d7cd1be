"""`DigitsDataModule`: scikit-learn's bundled 8x8 handwritten digits, offline and fast.

1797 grey images with values 0..16 in 10 classes, upsampled once to `image_size`
and kept as one tensor in memory, so an epoch costs almost nothing but the model.
The train/val/test split is stratified and drawn from its own fixed seed, so every
run, whatever its global seed, sees the same test set; with `num_folds`, the images
outside the test set are cut into stratified folds instead of a val split. Training
augmentation is a mild per-image random-resized crop done on whole batches; there is
no horizontal flip, since digits are not mirror-symmetric.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from einops import repeat
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset, default_collate
from torchvision.transforms.v2 import functional as TF

from vitlab.bounds import Count, Size
from vitlab.data.base import ImageDataModule
from vitlab.data.folds import fold_indices
from vitlab.data.transforms import BatchRandomResizedCrop
from vitlab.errors import ConfigError

DIGITS_MAX_VALUE = 16.0


def _augmenting_collate(
    samples: list[tuple[torch.Tensor, torch.Tensor]], augment: BatchRandomResizedCrop
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = default_collate(samples)
    return augment(images), labels


@dataclass(eq=False, repr=False, kw_only=True)
class DigitsDataModule(ImageDataModule):
    """The default dataset: small enough that a ViT learns it within minutes on a CPU.

    Attributes (beyond `ImageDataModule`'s):
        train_crop_scale: (min, max) fraction of the image area a training crop covers.
        train_crop_ratio: (min, max) aspect ratio of a training crop.
        val_size, test_size: images held out for validation and test; the remaining
            1797 - val_size - test_size train. With `num_folds`, `val_size` is unused:
            fold `fold` of the 1797 - test_size others validates.
    """

    batch_size: Count = 64
    image_size: Size = 32
    num_channels: Count = 1
    num_classes: Count = 10
    train_crop_scale: Sequence[float] = (0.9, 1.0)
    train_crop_ratio: Sequence[float] = (0.9, 1.1)
    val_size: Count = 200
    test_size: Count = 300

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes != 10:
            raise ConfigError(
                f"data.num_classes={self.num_classes} but digits has 10 classes; set data.num_classes=10"
            )
        if self.num_channels not in (1, 3):
            raise ConfigError(
                f"data.num_channels={self.num_channels} is not valid for digits; use 1 (grey) or 3 (grey repeated as RGB)"
            )
        self.augment = BatchRandomResizedCrop(self.train_crop_scale, self.train_crop_ratio)

    @property
    def class_names(self) -> list[str]:
        """The digits "0" to "9": label i is the digit i."""
        return [str(digit) for digit in range(10)]

    def setup(self, stage: str | None = None) -> None:
        digits = load_digits()
        pixels = torch.as_tensor(digits.images, dtype=torch.float32) / (DIGITS_MAX_VALUE / 2) - 1.0
        pixels = repeat(pixels, "n h w -> n c h w", c=self.num_channels)
        # Bilinear upsampling mixes neighbours convexly, so values stay in [-1, 1].
        images = TF.resize(pixels, [self.image_size, self.image_size], antialias=True)
        labels = torch.as_tensor(digits.target, dtype=torch.int64)

        rest, test = train_test_split(
            np.arange(len(labels)),
            test_size=self.test_size,
            stratify=digits.target,
            random_state=self.split_seed,
        )
        if self.num_folds is None:
            train, val = train_test_split(
                rest,
                test_size=self.val_size,
                stratify=digits.target[rest],
                random_state=self.split_seed,
            )
        else:
            in_train, in_val = fold_indices(
                digits.target[rest], self.num_folds, self.fold, self.split_seed
            )
            train, val = rest[in_train], rest[in_val]
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])
        self.test_set = TensorDataset(images[test], labels[test])

    def train_dataloader(self) -> DataLoader:
        collate = partial(_augmenting_collate, augment=self.augment)
        return self._dataloader(self.train_set, train=True, collate_fn=collate)
