"""`ImageFolderDataModule`: any dataset in the ImageNet folder layout.

    <data_dir>/train/<class>/<image>.jpg
    <data_dir>/val/<class>/<image>.jpg
    <data_dir>/test/<class>/<image>.jpg     (optional; without it, val is also the test set)

Class folders are sorted by name into label indices and must be the same in every
split; their names are the class names and their count is `num_classes` unless the
config gives one. The folders are checked when the datamodule is set up; images are
decoded lazily, and one that cannot be read stops the run with its path. With
`num_folds`, train/ is cut into stratified folds: fold `fold` validates (with the
evaluation transform) and val/ is left out, unless it is the test set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from PIL import Image
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder

from vitlab.bounds import Count
from vitlab.data.base import InceptionCropDataModule
from vitlab.data.folds import fold_indices
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


def _split_dir(data_dir: Path, split: str) -> Path:
    """`<data_dir>/<split>`, which must exist."""
    folder = data_dir / split
    if not folder.is_dir():
        raise DataError(
            f"No {split}/ folder in {data_dir}/ (looked for {folder}/); "
            f"expected the ImageNet layout {LAYOUT}"
        )
    return folder


def _class_folders(folder: Path) -> list[str]:
    """The class folder names in `folder`, sorted: their order gives the label indices."""
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if not classes:
        raise DataError(f"{folder}/ has no class folders; expected the ImageNet layout {LAYOUT}")
    return classes


@dataclass(eq=False, repr=False, kw_only=True)
class ImageFolderDataModule(InceptionCropDataModule):
    """ImageNet-style folders of images, one folder per class.

    `data_dir` has no default: it is the folder that holds `train/` and `val/`.
    Construction does not touch the disk; `class_names` and `setup` list `train/`.

    Attributes (beyond `InceptionCropDataModule`'s):
        num_classes: None (the default) takes the number of class folders under
            `train/` in `setup`; a number must equal it. The runs layer fills it from
            the folders before building the model (`vitlab.runs.classes.fill_num_classes`).
    """

    data_dir: str = field()  # required: `field()` drops the inherited default
    num_classes: Count | None = None

    def __post_init__(self) -> None:
        if self.num_channels not in PIL_MODES:
            raise ConfigError(
                f"data.num_channels={self.num_channels} is not valid for image folders; use 3 (RGB) or 1 (grey)"
            )
        super().__post_init__()
        self.loader = partial(load_image, mode=PIL_MODES[self.num_channels])

    @staticmethod
    def find_classes(data_dir: str | Path) -> list[str]:
        """The sorted class folder names of `<data_dir>/train`: label i is the i-th name.

        A `DataError` naming the folder and the expected layout when `train/` is
        missing or holds no class folders. Reads only the folder listing.
        """
        train_dir = _split_dir(Path(data_dir).expanduser().resolve(), "train")
        return _class_folders(train_dir)

    @property
    def class_names(self) -> list[str]:
        """The class folder names under `train/`, in label order (read from the disk)."""
        return self.find_classes(self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        classes = self.class_names
        if self.num_classes is None:
            self.num_classes = len(classes)
        elif len(classes) != self.num_classes:
            raise ConfigError(
                f"data.num_classes={self.num_classes} but {self.data_dir / 'train'}/ has "
                f"{len(classes)} class folders; set data.num_classes={len(classes)} "
                "(or leave it null to take the folders' count)"
            )
        if self.num_folds is not None:
            if stage in (None, "fit", "validate"):
                self.train_set, self.val_set = self._folds(classes)
        else:
            if stage in (None, "fit"):
                self.train_set = self._image_folder(self.data_dir / "train", classes, train=True)
            if stage in (None, "fit", "validate"):
                self.val_set = self._image_folder(
                    _split_dir(self.data_dir, "val"), classes, train=False
                )
        if stage in (None, "test"):
            test_dir = self.data_dir / "test"
            split_dir = test_dir if test_dir.is_dir() else _split_dir(self.data_dir, "val")
            self.test_set = self._image_folder(split_dir, classes, train=False)

    def _folds(self, classes: list[str]) -> tuple[Subset, Subset]:
        """(train, val): the training folds of train/ with the training transform, and
        the held-out fold with the evaluation one: two `ImageFolder`s of train/, whose
        sorted listings agree, so that each image has one transform."""
        train_dir = self.data_dir / "train"
        augmented = self._image_folder(train_dir, classes, train=True)
        plain = self._image_folder(train_dir, classes, train=False)
        train, val = fold_indices(augmented.targets, self.num_folds, self.fold, self.split_seed)
        return Subset(augmented, train), Subset(plain, val)

    def _image_folder(self, folder: Path, train_classes: list[str], train: bool) -> ImageFolder:
        """One split's `ImageFolder`, once its class folders are checked against train's."""
        classes = _class_folders(folder)
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
