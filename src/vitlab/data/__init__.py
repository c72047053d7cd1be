"""LightningDataModules yielding `(images, labels)`: float32 NCHW in [-1, 1], int64 labels.

Each takes plain arguments (Hydra builds them from `conf/data/<name>.yaml`) and
exposes `image_size`, `num_channels` and `num_classes` for the model to match.
`batch_size` is always the global batch. Knows nothing of the models.
"""

from vitlab.data.base import ImageDataModule, InceptionCropDataModule
from vitlab.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from vitlab.data.digits import DigitsDataModule
from vitlab.data.image_folder import ImageFolderDataModule
from vitlab.data.medmnist import MedMNISTDataModule
from vitlab.data.synthetic import SyntheticDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "InceptionCropDataModule",
    "MedMNISTDataModule",
    "SyntheticDataModule",
]
