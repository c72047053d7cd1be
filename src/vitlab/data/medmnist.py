"""`MedMNISTDataModule`: the 2D sets of MedMNIST v2/v3 from their official `.npz` files.

Each set is one file, `<flag>.npz` (28x28) or `<flag>_<size>.npz` (64, 128 or 224:
MedMNIST+), from the release at `MEDMNIST_RECORD`, holding `train_images`,
`train_labels`, `val_images`, `val_labels`, `test_images` and `test_labels`: uint8
images (n, h, w) for grey sets or (n, h, w, 3) for RGB ones, and labels (n, 1). The
official split is kept; with `num_folds`, its train and val images are pooled and
cut into stratified folds, and the test set stays. Nothing is downloaded: a missing
file stops the run with the address to fetch it from and the path to put it at.

The uint8 arrays stay in memory as read (the 224-pixel sets are gigabytes; a float
copy would be four times that), and each batch is converted when it is collated:
to float in [-1, 1], to `num_channels` (grey repeated, or RGB to luma as PIL's "L"),
resized to `image_size`, and for training a mild random-resized crop and, if asked,
a flip. The MedMNIST baselines train with no augmentation at all; the crop is the
digits' mild one. The flip is off by default because orientation carries meaning
here: OrganA/C/SMNIST's labels name left and right organs, and chest X-rays have a
side.

vitlab trains single-label classifiers, so the multi-label ChestMNIST is refused.
RetinaMNIST's ordinal grades are trained as five plain classes (cross-entropy, accuracy).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from einops import rearrange, repeat
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    Subset,
    TensorDataset,
    default_collate,
)
from torchvision.transforms.v2 import functional as TF

from vitlab.bounds import Count, Size
from vitlab.data.base import ImageDataModule
from vitlab.data.folds import fold_indices
from vitlab.data.transforms import BatchRandomResizedCrop
from vitlab.errors import ConfigError, DataError

MEDMNIST_RECORD = "https://zenodo.org/records/10519652"
"""The Zenodo record of the current MedMNIST release (v3), which holds every file."""

MedMNISTFlag = Literal[
    "pathmnist",
    "chestmnist",
    "dermamnist",
    "octmnist",
    "pneumoniamnist",
    "retinamnist",
    "breastmnist",
    "bloodmnist",
    "tissuemnist",
    "organamnist",
    "organcmnist",
    "organsmnist",
]

MedMNISTSize = Literal[28, 64, 128, 224]

SPLITS = ("train", "val", "test")


class MedMNISTSet(NamedTuple):
    """What MedMNIST's `INFO` says of one 2D set: its task, channels and label names."""

    task: str
    num_channels: int
    class_names: tuple[str, ...]


ORGAN_NAMES = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)

# Label i of a set is its i-th name (MedMNIST's INFO[flag]["label"]).
MEDMNIST_SETS: dict[str, MedMNISTSet] = {
    "pathmnist": MedMNISTSet(
        "multi-class",
        3,
        (
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal colon mucosa",
            "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ),
    ),
    "chestmnist": MedMNISTSet(
        "multi-label, binary-class",
        1,
        (
            "atelectasis",
            "cardiomegaly",
            "effusion",
            "infiltration",
            "mass",
            "nodule",
            "pneumonia",
            "pneumothorax",
            "consolidation",
            "edema",
            "emphysema",
            "fibrosis",
            "pleural",
            "hernia",
        ),
    ),
    "dermamnist": MedMNISTSet(
        "multi-class",
        3,
        (
            "actinic keratoses and intraepithelial carcinoma",
            "basal cell carcinoma",
            "benign keratosis-like lesions",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        ),
    ),
    "octmnist": MedMNISTSet(
        "multi-class",
        1,
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    ),
    "pneumoniamnist": MedMNISTSet("binary-class", 1, ("normal", "pneumonia")),
    "retinamnist": MedMNISTSet("ordinal-regression", 3, ("0", "1", "2", "3", "4")),
    "breastmnist": MedMNISTSet("binary-class", 1, ("malignant", "normal, benign")),
    "bloodmnist": MedMNISTSet(
        "multi-class",
        3,
        (
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ),
    ),
    "tissuemnist": MedMNISTSet(
        "multi-class",
        1,
        (
            "Collecting Duct, Connecting Tubule",
            "Distal Convoluted Tubule",
            "Glomerular endothelial cells",
            "Interstitial endothelial cells",
            "Leukocytes",
            "Podocytes",
            "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ),
    ),
    "organamnist": MedMNISTSet("multi-class", 1, ORGAN_NAMES),
    "organcmnist": MedMNISTSet("multi-class", 1, ORGAN_NAMES),
    "organsmnist": MedMNISTSet("multi-class", 1, ORGAN_NAMES),
}

CHANNEL_WORDS = {1: "grey", 3: "RGB"}


def _multi_label(info: MedMNISTSet) -> bool:
    return info.task.startswith("multi-label")


def medmnist_set(flag: str) -> MedMNISTSet:
    """The table entry of a single-label 2D `flag`; a `ConfigError` for any other flag."""
    if not isinstance(flag, str) or flag not in MEDMNIST_SETS:
        volumes = " (the *mnist3d sets are volumes, not images)" if str(flag).endswith("3d") else ""
        single_label = [name for name, info in MEDMNIST_SETS.items() if not _multi_label(info)]
        raise ConfigError(
            f"data.flag={flag!r} is not a 2D MedMNIST set{volumes}; "
            f"use one of {', '.join(single_label)}"
        )
    info = MEDMNIST_SETS[flag]
    if _multi_label(info):
        raise ConfigError(
            f"data.flag={flag!r} is multi-label ({len(info.class_names)} yes/no labels per image) and "
            "vitlab trains single-label classifiers; pick a single-label set, e.g. "
            "data.flag=pneumoniamnist"
        )
    return info


def file_name(flag: str, size: int) -> str:
    """The release's name for a set at a size: `<flag>.npz` at 28, `<flag>_<size>.npz` above."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def download_url(flag: str, size: int) -> str:
    """Where the release serves `file_name(flag, size)`."""
    return f"{MEDMNIST_RECORD}/files/{file_name(flag, size)}?download=1"


def _channels_of(images: np.ndarray) -> int | None:
    """1 for (n, h, w) images, c for (n, h, w, c) ones, None for any other shape."""
    if images.ndim == 3:
        return 1
    return images.shape[-1] if images.ndim == 4 else None


class MedMNISTBatch:
    """Collate uint8 (c, h, w) samples into a float32 (b, num_channels, image_size, image_size) batch in [-1, 1].

    Channels are converted first (on 0..255 values, as PIL would), then the batch is
    resized to `image_size` and, for training, cropped per image (`crop`) and flipped
    per image with probability 1/2 (`hflip`). Randomness comes from the global torch
    RNG, which the training loader seeds per batch. Picklable, so it can run in
    DataLoader workers.
    """

    def __init__(
        self,
        image_size: int,
        num_channels: int,
        crop: BatchRandomResizedCrop | None = None,
        hflip: bool = False,
    ) -> None:
        self.image_size = image_size
        self.num_channels = num_channels
        self.crop = crop
        self.hflip = hflip

    def __call__(
        self, samples: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = default_collate(samples)
        images = images.float()
        if images.shape[1] == 3 and self.num_channels == 1:
            images = TF.rgb_to_grayscale(images)
        elif images.shape[1] == 1 and self.num_channels == 3:
            images = repeat(images, "b 1 h w -> b c h w", c=3)
        images = images / 127.5 - 1.0
        if images.shape[-1] != self.image_size:
            # Bilinear weights are convex, so values stay in [-1, 1].
            images = TF.resize(images, [self.image_size, self.image_size], antialias=True)
        if self.crop is not None:
            images = self.crop(images)
        if self.hflip:
            flipped = torch.rand(images.shape[0]) < 0.5
            images = torch.where(rearrange(flipped, "b -> b 1 1 1"), images.flip(-1), images)
        return images, labels


@dataclass(eq=False, repr=False, kw_only=True)
class MedMNISTDataModule(ImageDataModule):
    """One 2D MedMNIST set at one resolution, read from `<data_dir>/<flag>[_<size>].npz`.

    Construction checks the fields against the table and reads no file; `setup`
    reads the file and checks its keys, shapes and labels.

    Attributes (beyond `ImageDataModule`'s):
        flag: the set, by MedMNIST's name (`pneumoniamnist`, `pathmnist`, ...).
        size: the side of the file's images: 28 (MedMNIST v2) or 64, 128, 224 (MedMNIST+).
        image_size: the side the model sees; None: `size` (no resampling).
        num_channels: 3 (grey sets repeated, so every set fits one model) or 1
            (RGB sets turned to luma).
        num_classes: None (the default) takes the set's; any other number is an error.
        train_crop_scale: (min, max) fraction of the image area a training crop covers.
        train_crop_ratio: (min, max) aspect ratio of a training crop.
        hflip: random horizontal flips in training (off: left and right carry meaning
            in the organ and chest sets).
    """

    flag: MedMNISTFlag = "pneumoniamnist"
    size: MedMNISTSize = 28
    data_dir: str = "data/medmnist"
    batch_size: Count = 128
    image_size: Size | None = None
    num_channels: Count = 3
    num_classes: Count | None = None
    train_crop_scale: Sequence[float] = (0.9, 1.0)
    train_crop_ratio: Sequence[float] = (0.9, 1.1)
    hflip: bool = False

    def __post_init__(self) -> None:
        info = medmnist_set(self.flag)
        if self.size not in (28, 64, 128, 224):
            raise ConfigError(
                f"data.size={self.size!r} is not a MedMNIST size; use 28, 64, 128 or 224"
            )
        if self.num_channels not in CHANNEL_WORDS:
            raise ConfigError(
                f"data.num_channels={self.num_channels} is not valid for MedMNIST; "
                "use 3 (RGB; grey sets repeated) or 1 (grey; RGB sets turned to luma)"
            )
        expected = len(info.class_names)
        if self.num_classes not in (None, expected):
            raise ConfigError(
                f"data.num_classes={self.num_classes} but {self.flag} has {expected} classes; "
                f"set data.num_classes={expected} (or null)"
            )
        self.num_classes = expected
        if self.image_size is None:
            self.image_size = self.size
        super().__post_init__()
        crop = BatchRandomResizedCrop(self.train_crop_scale, self.train_crop_ratio)
        self.train_batch = MedMNISTBatch(self.image_size, self.num_channels, crop, self.hflip)
        self.eval_batch = MedMNISTBatch(self.image_size, self.num_channels)

    @staticmethod
    def find_classes(flag: str) -> list[str]:
        """The label names of `flag`, in label order, from the table (no file is read).

        The runs layer calls it to fill `data.num_classes` before building the model
        (`vitlab.runs.classes.fill_num_classes`); a multi-label or unknown flag is a
        `ConfigError` there already.
        """
        return list(medmnist_set(flag).class_names)

    @property
    def class_names(self) -> list[str]:
        """The set's label names, in label order."""
        return self.find_classes(self.flag)

    @property
    def path(self) -> Path:
        """The file this datamodule reads: `<data_dir>/<flag>.npz` or `<data_dir>/<flag>_<size>.npz`."""
        return self.data_dir / file_name(self.flag, self.size)

    def setup(self, stage: str | None = None) -> None:
        with self._open() as npz:
            if stage in (None, "fit", "validate"):
                self.train_set, self.val_set = self._train_val(npz)
            if stage in (None, "test"):
                self.test_set = self._read_split(npz, "test")

    def train_dataloader(self) -> DataLoader:
        return self._dataloader(self.train_set, train=True, collate_fn=self.train_batch)

    def val_dataloader(self) -> DataLoader:
        return self._dataloader(self.val_set, train=False, collate_fn=self.eval_batch)

    def test_dataloader(self) -> DataLoader:
        return self._dataloader(self.test_set, train=False, collate_fn=self.eval_batch)

    def _open(self) -> np.lib.npyio.NpzFile:
        """The `.npz` file, once it is known to hold the six arrays of the release's layout."""
        if not self.path.is_file():
            raise DataError(
                f"MedMNIST file not found: {self.path}. Download {download_url(self.flag, self.size)} "
                f"({self.flag} at {self.size}x{self.size}, from the release at {MEDMNIST_RECORD}) "
                f"and put it at {self.path}, or point data.data_dir at the folder that holds "
                f"{self.path.name}."
            )
        try:
            npz = np.load(self.path)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise DataError(
                f"Cannot read {self.path} as a .npz file ({err}); download it again from "
                f"{download_url(self.flag, self.size)}"
            ) from err
        expected = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
        missing = [key for key in expected if key not in npz.files]
        if missing:
            npz.close()
            raise DataError(
                f"{self.path} lacks {', '.join(missing)} (it holds {', '.join(npz.files) or 'nothing'}); "
                f"a MedMNIST file holds {', '.join(expected)}"
            )
        return npz

    def _train_val(self, npz: np.lib.npyio.NpzFile) -> tuple[Dataset, Dataset]:
        """The official train and val splits; with `num_folds`, the folds of their union
        (every image outside the test set), drawn without copying the images."""
        train, val = self._read_split(npz, "train"), self._read_split(npz, "val")
        if self.num_folds is None:
            return train, val
        labels = torch.cat([train.tensors[1], val.tensors[1]]).numpy()
        in_train, in_val = fold_indices(labels, self.num_folds, self.fold, self.split_seed)
        pool = ConcatDataset([train, val])
        return Subset(pool, in_train.tolist()), Subset(pool, in_val.tolist())

    def _read_split(self, npz: np.lib.npyio.NpzFile, split: str) -> TensorDataset:
        """One split: uint8 (n, c, size, size) images and int64 (n,) labels, checked against the table."""
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
        where = f"{self.path}: {split}_images"
        info = MEDMNIST_SETS[self.flag]
        channels = _channels_of(images)
        if images.dtype != np.uint8 or channels not in CHANNEL_WORDS:
            raise DataError(
                f"{where} are {images.dtype} of shape {images.shape}; a MedMNIST file holds uint8 "
                "(n, h, w) grey or (n, h, w, 3) RGB images"
            )
        if channels != info.num_channels:
            raise DataError(
                f"{where} are {CHANNEL_WORDS[channels]} but {self.flag} is "
                f"{CHANNEL_WORDS[info.num_channels]}; is {self.path.name} the {self.flag} file?"
            )
        if images.shape[1:3] != (self.size, self.size):
            height, width = images.shape[1:3]
            raise DataError(
                f"{where} are {height}x{width} but data.size={self.size} reads "
                f"{self.size}x{self.size} images; set data.size to the file's size"
            )
        label_shapes = ((len(images),), (len(images), 1))
        if not np.issubdtype(labels.dtype, np.integer) or labels.shape not in label_shapes:
            raise DataError(
                f"{self.path}: {split}_labels are {labels.dtype} of shape {labels.shape}; expected "
                f"one integer label per image, shape ({len(images)}, 1)"
            )
        num_classes = len(info.class_names)
        if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
            raise DataError(
                f"{self.path}: {split}_labels range over {labels.min()}..{labels.max()} but "
                f"{self.flag} has labels 0..{num_classes - 1}"
            )
        pixels = torch.from_numpy(images)
        pixels = (
            rearrange(pixels, "n h w -> n 1 h w")
            if images.ndim == 3
            else rearrange(pixels, "n h w c -> n c h w")
        )
        return TensorDataset(pixels, torch.from_numpy(labels.reshape(-1).astype(np.int64)))
