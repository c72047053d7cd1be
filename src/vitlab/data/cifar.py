"""CIFAR-10 and CIFAR-100 through torchvision, split as in the paper's fine-tuning runs.

The original trains on `train[:98%]`, validates on `train[98%:]` (the last 1000
images, in file order) and tests on the official test set; so do these. With
`num_folds`, the 50 000 train images are cut into stratified folds instead and
fold `fold` validates; the test set stays the official one. Images
are 32x32 and are upsampled by the crop/resize to `image_size` (224 or 384 for the
paper's recipes). The data is looked for in `<data_dir>/cifar-10-batches-py/`
(`cifar-100-python/`) and downloaded there in `prepare_data()` when `download` is on.
CIFAR-10's class names are fixed here; CIFAR-100's are read from the downloaded `meta`.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset, Subset
from torchvision.datasets import CIFAR10, CIFAR100

from vitlab.bounds import Count
from vitlab.data.base import InceptionCropDataModule
from vitlab.data.folds import fold_indices
from vitlab.errors import ConfigError, DataError

# torchvision's order (`CIFAR10.classes`, from batches.meta): label i is the i-th name.
CIFAR10_CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class _Transformed(Dataset):
    """A view of `dataset` with `transform` applied to its images: one copy in memory
    serves both the train and the val split."""

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return self.transform(image), label


@dataclass(eq=False, repr=False, kw_only=True)
class CIFAR10DataModule(InceptionCropDataModule):
    """CIFAR-10: 50 000 train (less `val_size` for val) and 10 000 test images, 10 classes.

    Attributes (beyond `InceptionCropDataModule`'s):
        num_classes: defaults to the dataset's; any other value is an error.
        download: fetch the archive into `data_dir` if it is not there (needs internet).
        val_size: images at the end of the train set held out for validation; unused
            with `num_folds` (a fold of the train set validates instead).
    """

    dataset_class: ClassVar[type[CIFAR10]] = CIFAR10
    name: ClassVar[str] = "CIFAR-10"
    dataset_num_classes: ClassVar[int] = 10

    num_classes: Count | None = None
    download: bool = True
    val_size: Count = 1000

    def __post_init__(self) -> None:
        expected = self.dataset_num_classes
        if self.num_classes not in (None, expected):
            raise ConfigError(
                f"data.num_classes={self.num_classes} but {self.name} has {expected} classes; "
                f"set data.num_classes={expected}"
            )
        if self.num_channels != 3:
            raise ConfigError(
                f"data.num_channels={self.num_channels} but {self.name} is RGB; set data.num_channels=3"
            )
        self.num_classes = expected
        super().__post_init__()

    @property
    def class_names(self) -> list[str] | None:
        """The ten CIFAR-10 names, in label order."""
        return list(CIFAR10_CLASS_NAMES)

    @property
    def folder(self) -> str:
        """Where torchvision keeps this dataset: `<data_dir>/<base folder>`."""
        return str(self.data_dir / self.dataset_class.base_folder)

    def prepare_data(self) -> None:
        """Download (once, on one process per machine) when `download` is on."""
        if not self.download:
            return
        try:
            self.dataset_class(str(self.data_dir), train=False, download=True)
        except (OSError, RuntimeError) as err:
            raise DataError(
                f"Could not download {self.name} from {self.dataset_class.url} into {self.data_dir}/ "
                f"({type(err).__name__}: {err}). Without internet, fetch that archive on another "
                f"machine, unpack it into {self.data_dir}/ so that {self.folder}/ exists, "
                f"and set data.download=false."
            ) from err

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate"):
            full = self._torchvision_split(train=True)
            train, val = self._train_val_indices(full)
            self.train_set = _Transformed(Subset(full, train), self.train_transform)
            self.val_set = _Transformed(Subset(full, val), self.eval_transform)
        if stage in (None, "test"):
            self.test_set = _Transformed(self._torchvision_split(train=False), self.eval_transform)

    def _train_val_indices(self, full: CIFAR10) -> tuple[Sequence[int], Sequence[int]]:
        """Where train and val lie in the official train set: the held-out fold with
        `num_folds`, else the last `val_size` images (the original's train[98%:])."""
        if self.num_folds is not None:
            return fold_indices(full.targets, self.num_folds, self.fold, self.split_seed)
        if not 0 < self.val_size < len(full):
            raise ConfigError(
                f"data.val_size={self.val_size} must be between 1 and {len(full) - 1} "
                f"(the {len(full)} training images of {self.name})"
            )
        split = len(full) - self.val_size
        return range(split), range(split, len(full))

    def _torchvision_split(self, train: bool) -> CIFAR10:
        """The official train or test set as torchvision reads it, untransformed."""
        try:
            return self.dataset_class(str(self.data_dir), train=train, download=False)
        except RuntimeError as err:
            raise DataError(
                f"{self.name} not found (or corrupt) in {self.folder}/. Set data.download=true to "
                f"fetch {self.dataset_class.url} (needs internet), or download it elsewhere and "
                f"unpack it into {self.data_dir}/ so that {self.folder}/ holds the python batches."
            ) from err


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels): 50 000 train (less `val_size`) and 10 000 test images, 100 classes."""

    dataset_class = CIFAR100
    name = "CIFAR-100"
    dataset_num_classes = 100

    @property
    def class_names(self) -> list[str] | None:
        """The fine label names from the downloaded `meta` file, as torchvision reads them.

        None while the file is missing or unreadable: before the download (`prepare_data`),
        or a broken dataset, which `setup` then reports.
        """
        meta = Path(self.folder) / self.dataset_class.meta["filename"]
        try:
            with meta.open("rb") as file:
                names = pickle.load(file, encoding="latin1")[self.dataset_class.meta["key"]]
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError):
            return None
        return [str(name) for name in names]
