"""`ImageFolderDataModule`: any dataset in the ImageNet folder layout.

    <data_dir>/train/<class>/<image>.jpg
    <data_dir>/val/<class>/<image>.jpg
    <data_dir>/test/<class>/<image>.jpg     (optional; without it, val is also the test set)

Class folders are sorted by name into label indices and must be the same in every
split. The folders are checked when the datamodule is set up; images are decoded
lazily, and one that cannot be read stops the run with its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

from PIL import Image
from torchvision.datasets import ImageFolder

from vitlab.data.base import ImageDataModule
from vitlab.data.transforms import eval_transform, train_transform
from vitlab.errors import ConfigError, DataError

PIL_MODES = {1: "L", 3: "RGB"}

LAYOUT = "<data_dir>/{train,val}/<class>/<image>.jpg (and optionally test/)"


def load_image(path: str, mode: str) -> Image.Image:
    """Decode the image at `path` into PIL `mode`; a file PIL cannot read is a `DataError` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except OSError as err:
        raise DataError(f"Cannot read image {path} ({err}); remove or replace the file") from err


class ImageFolderDataModule(ImageDataModule):
    """ImageNet-style folders of images, one folder per class.

    Attributes (beyond `ImageDataModule`'s):
        num_classes: must equal the number of class folders.
        train_crop_scale: (min, max) fraction of the image area a training crop covers.
        train_crop_ratio: (min, max) aspect ratio of a training crop.
        hflip: random horizontal flips in training.
        randaugment: (num_ops, magnitude) of RandAugment in training, or None (the original).
        mixup_alpha, cutmix_alpha: Mixup / CutMix of training batches (see `ImageDataModule`).
    """

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 512,
        num_workers: int = 8,
        image_size: int = 224,
        num_channels: int = 3,
        num_classes: int = 1000,
        pin_memory: bool = True,
        train_crop_scale: Sequence[float] = (0.05, 1.0),
        train_crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        randaugment: Sequence[int] | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
    ) -> None:
        if num_channels not in PIL_MODES:
            raise ConfigError(
                f"data.num_channels={num_channels} is not valid for image folders; use 3 (RGB) or 1 (grey)"
            )
        super().__init__(
            data_dir, batch_size, num_workers, image_size, num_channels, num_classes, pin_memory,
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
        )  # fmt: skip
        self.loader = partial(load_image, mode=PIL_MODES[num_channels])
        self.train_transform = train_transform(
            image_size, num_channels, train_crop_scale, train_crop_ratio, hflip, randaugment
        )
        self.eval_transform = eval_transform(image_size, num_channels)

    def setup(self, stage: str | None = None) -> None:
        train_dir = self._split_dir("train")
        classes = self._classes(train_dir)
        if len(classes) != self.num_classes:
            raise ConfigError(
                f"data.num_classes={self.num_classes} but {train_dir}/ has {len(classes)} class "
                f"folders; set data.num_classes={len(classes)}"
            )
        if stage in (None, "fit"):
            self.train_set = self._split(train_dir, classes, train=True)
        if stage in (None, "fit", "validate"):
            self.val_set = self._split(self._split_dir("val"), classes, train=False)
        if stage in (None, "test"):
            test_dir = self.data_dir / "test"
            split_dir = test_dir if test_dir.is_dir() else self._split_dir("val")
            self.test_set = self._split(split_dir, classes, train=False)

    def _split_dir(self, split: str) -> Path:
        folder = self.data_dir / split
        if not folder.is_dir():
            raise DataError(
                f"No {split}/ folder in {self.data_dir}/ (looked for {folder}/); "
                f"expected the ImageNet layout {LAYOUT}"
            )
        return folder

    def _classes(self, folder: Path) -> list[str]:
        classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
        if not classes:
            raise DataError(
                f"{folder}/ has no class folders; expected the ImageNet layout {LAYOUT}"
            )
        return classes

    def _split(self, folder: Path, train_classes: list[str], train: bool) -> ImageFolder:
        classes = self._classes(folder)
        if classes != train_classes:
            only_train = sorted(set(train_classes) - set(classes))
            only_here = sorted(set(classes) - set(train_classes))
            raise DataError(
                f"The class folders of {folder}/ differ from those of {self.data_dir / 'train'}/: "
                f"only in train: {only_train}; only in {folder.name}: {only_here}. "
                "Every split needs the same class folders."
            )
        transform = self.train_transform if train else self.eval_transform
        try:
            return ImageFolder(str(folder), transform=transform, loader=self.loader)
        except FileNotFoundError as err:
            raise DataError(f"{folder}/ holds no usable images: {err}") from err
