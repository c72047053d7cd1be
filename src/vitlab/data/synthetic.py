"""`SyntheticDataModule`: random images of any shape, for benchmarks and tests.

Images are uniform in [-1, 1] and labels uniform over the classes, drawn once from
a fixed seed and kept in memory (num_samples x num_channels x image_size^2 x 4 bytes),
so loading costs nothing and measurements see the model alone. Nothing is learnable
and nothing is augmented. With `num_folds`, the train split is the pool the folds
cut (its val split is drawn and left out, so that the test split stays the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from vitlab.bounds import Count, NonNegativeInt, Size
from vitlab.data.base import ImageDataModule
from vitlab.data.folds import fold_indices


@dataclass(eq=False, repr=False, kw_only=True)
class SyntheticDataModule(ImageDataModule):
    """Random `(images, labels)` at the configured size, channels and classes.

    Attributes (beyond `ImageDataModule`'s):
        num_samples: size of the train split.
        num_eval_samples: size of each of the val and test splits (with `num_folds`, of
            the test split only).
        seed: seed of the generator; the data does not depend on the run's seed.
            The folds have their own seed, `split_seed`.
    """

    batch_size: Count = 32
    image_size: Size = 224
    num_channels: Count = 3
    num_classes: Count = 1000
    num_samples: Count = 256
    num_eval_samples: Count = 64
    seed: NonNegativeInt = 0

    def setup(self, stage: str | None = None) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        self.train_set = self._random_split(self.num_samples, generator)
        self.val_set = self._random_split(self.num_eval_samples, generator)
        self.test_set = self._random_split(self.num_eval_samples, generator)
        if self.num_folds is not None:
            images, labels = self.train_set.tensors
            train, val = fold_indices(labels, self.num_folds, self.fold, self.split_seed)
            self.train_set = TensorDataset(images[train], labels[train])
            self.val_set = TensorDataset(images[val], labels[val])

    def _random_split(self, size: int, generator: torch.Generator) -> TensorDataset:
        shape = (size, self.num_channels, self.image_size, self.image_size)
        images = torch.rand(shape, generator=generator) * 2.0 - 1.0
        labels = torch.randint(self.num_classes, (size,), generator=generator)
        return TensorDataset(images, labels)
