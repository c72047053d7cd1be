"""CIFAR-10 and CIFAR-100 through torchvision, split as in the paper's fine-tuning runs.

The original trains on `train[:98%]`, validates on `train[98%:]` (the last 1000
images, in file order) and tests on the official test set; so do these. Images
are 32x32 and are upsampled by the crop/resize to `image_size` (224 or 384 for the
paper's recipes). The data is looked for in `<data_dir>/cifar-10-batches-py/`
(`cifar-100-python/`) and downloaded there in `prepare_data()` when `download` is on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import Dataset, Subset
from torchvision.datasets import CIFAR10, CIFAR100

from vitlab.data.base import ImageDataModule
from vitlab.data.transforms import eval_transform, train_transform
from vitlab.errors import ConfigError, DataError


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


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 50 000 train (less `val_size` for val) and 10 000 test images, 10 classes.

    Attributes (beyond `ImageDataModule`'s):
        num_classes: defaults to the dataset's; any other value is an error.
        download: fetch the archive into `data_dir` if it is not there (needs internet).
        val_size: images at the end of the train set held out for validation.
        train_crop_scale: (min, max) fraction of the image area a training crop covers.
        train_crop_ratio: (min, max) aspect ratio of a training crop.
        hflip: random horizontal flips in training.
        randaugment: (num_ops, magnitude) of RandAugment in training, or None (the original).
        mixup_alpha, cutmix_alpha: Mixup / CutMix of training batches (see `ImageDataModule`).
    """

    dataset_class: type[CIFAR10] = CIFAR10
    name = "CIFAR-10"
    dataset_num_classes = 10

    def __init__(
        self,
        data_dir: str = "data/",
        batch_size: int = 512,
        num_workers: int = 8,
        image_size: int = 224,
        num_channels: int = 3,
        num_classes: int | None = None,
        pin_memory: bool = True,
        download: bool = True,
        val_size: int = 1000,
        train_crop_scale: Sequence[float] = (0.05, 1.0),
        train_crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        randaugment: Sequence[int] | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
    ) -> None:
        expected = self.dataset_num_classes
        if num_classes not in (None, expected):
            raise ConfigError(
                f"data.num_classes={num_classes} but {self.name} has {expected} classes; "
                f"set data.num_classes={expected}"
            )
        if num_channels != 3:
            raise ConfigError(
                f"data.num_channels={num_channels} but {self.name} is RGB; set data.num_channels=3"
            )
        super().__init__(
            data_dir, batch_size, num_workers, image_size, num_channels, expected, pin_memory,
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
        )  # fmt: skip
        self.download = download
        self.val_size = val_size
        self.train_transform = train_transform(
            image_size, num_channels, train_crop_scale, train_crop_ratio, hflip, randaugment
        )
        self.eval_transform = eval_transform(image_size, num_channels)

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
            full = self._load(train=True)
            if not 0 < self.val_size < len(full):
                raise ConfigError(
                    f"data.val_size={self.val_size} must be between 1 and {len(full) - 1} "
                    f"(the {len(full)} training images of {self.name})"
                )
            split = len(full) - self.val_size
            self.train_set = _Transformed(Subset(full, range(split)), self.train_transform)
            self.val_set = _Transformed(Subset(full, range(split, len(full))), self.eval_transform)
        if stage in (None, "test"):
            self.test_set = _Transformed(self._load(train=False), self.eval_transform)

    def _load(self, train: bool) -> CIFAR10:
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
