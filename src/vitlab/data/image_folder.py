"""`ImageFolderDataModule`: any dataset in the ImageNet folder layout.

    <data_dir>/train/<class>/<image>.jpg
    <data_dir>/val/<class>/<image>.jpg
    <data_dir>/test/<class>/<image>.jpg     (optional; without it, val is also the test set)

Class folders are sorted by name into label indices and must be the same in every
split. The folders are checked when the datamodule is set up; images are decoded
lazily, and one that cannot be read stops the run with its path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from PIL import Image
from torchvision.datasets import ImageFolder

from vitlab.data.base import InceptionCropDataModule
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


@dataclass(eq=False, repr=False, kw_only=True)
class ImageFolderDataModule(InceptionCropDataModule):
    """ImageNet-style folders of images, one folder per class.

    `data_dir` has no default: it is the folder that holds `train/` and `val/`.

    Attributes (beyond `InceptionCropDataModule`'s):
        num_classes: must equal the number of class folders.
    """

    data_dir: str = field()  # required: `field()` drops the inherited default
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if self.num_channels not in PIL_MODES:
            raise ConfigError(
                f"data.num_channels={self.num_channels} is not valid for image folders; use 3 (RGB) or 1 (grey)"
            )
        super().__post_init__()
        self.loader = partial(load_image, mode=PIL_MODES[self.num_channels])

    def setup(self, stage: str | None = None) -> None:
        train_dir = self._split_dir("train")
        classes = self._class_folders(train_dir)
        if len(classes) != self.num_classes:
            raise ConfigError(
                f"data.num_classes={self.num_classes} but {train_dir}/ has {len(classes)} class "
                f"folders; set data.num_classes={len(classes)}"
            )
        if stage in (None, "fit"):
            self.train_set = self._image_folder(train_dir, classes, train=True)
        if stage in (None, "fit", "validate"):
            self.val_set = self._image_folder(self._split_dir("val"), classes, train=False)
        if stage in (None, "test"):
            test_dir = self.data_dir / "test"
            split_dir = test_dir if test_dir.is_dir() else self._split_dir("val")
            self.test_set = self._image_folder(split_dir, classes, train=False)

    def _split_dir(self, split: str) -> Path:
        """`<data_dir>/<split>`, which must exist."""
        folder = self.data_dir / split
        if not folder.is_dir():
            raise DataError(
                f"No {split}/ folder in {self.data_dir}/ (looked for {folder}/); "
                f"expected the ImageNet layout {LAYOUT}"
            )
        return folder

    def _class_folders(self, folder: Path) -> list[str]:
        """The class folder names in `folder`, sorted: their order gives the label indices."""
        classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
        if not classes:
            raise DataError(
                f"{folder}/ has no class folders; expected the ImageNet layout {LAYOUT}"
            )
        return classes

    def _image_folder(self, folder: Path, train_classes: list[str], train: bool) -> ImageFolder:
        """One split's `ImageFolder`, once its class folders are checked against train's."""
        classes = self._class_folders(folder)
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
