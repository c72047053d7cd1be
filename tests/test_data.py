"""The datamodules: shapes, ranges, splits, the global batch, and the errors users see."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from types import SimpleNamespace
from urllib.error import URLError

import hydra
import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from omegaconf import OmegaConf
from PIL import Image

from vitlab.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
)
from vitlab.data.transforms import BatchRandomResizedCrop
from vitlab.errors import ConfigError, DataError

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"


def first_batch(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(loader))


def all_labels(loader: torch.utils.data.DataLoader) -> torch.Tensor:
    return torch.cat([labels for _, labels in loader])


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    datamodule = DigitsDataModule(batch_size=32)
    datamodule.setup()
    return datamodule


# --- digits ------------------------------------------------------------------------


def test_digits_batches_are_float_nchw_at_image_size(digits: DigitsDataModule) -> None:
    for loader in (digits.train_dataloader(), digits.test_dataloader()):
        images, labels = first_batch(loader)
        assert images.shape == (32, 1, 32, 32)
        assert images.dtype == torch.float32
        assert labels.shape == (32,)
        assert labels.dtype == torch.int64


def test_digits_pixels_lie_in_minus_one_to_one(digits: DigitsDataModule) -> None:
    for loader in (digits.train_dataloader(), digits.val_dataloader()):
        images, _ = first_batch(loader)
        assert images.min() >= -1.0
        assert images.max() <= 1.0
        assert images.min() < -0.9 and images.max() > 0.9


def test_digits_split_sizes_are_fixed_and_disjoint(digits: DigitsDataModule) -> None:
    splits = [digits.train_set, digits.val_set, digits.test_set]
    assert [len(split) for split in splits] == [1297, 200, 300]
    images = [split.tensors[0] for split in splits]
    # No image of one split appears in another (digits has no exact duplicates across them).
    for i in range(3):
        for j in range(i + 1, 3):
            distances = torch.cdist(images[i].flatten(1), images[j].flatten(1))
            assert distances.min() > 0


def test_digits_split_does_not_depend_on_the_global_seed() -> None:
    tests = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        np.random.seed(seed)
        datamodule = DigitsDataModule()
        datamodule.setup()
        tests.append(datamodule.test_set.tensors)
    assert torch.equal(tests[0][0], tests[1][0])
    assert torch.equal(tests[0][1], tests[1][1])


def test_digits_labels_are_0_to_9_in_every_split(digits: DigitsDataModule) -> None:
    for split in (digits.train_set, digits.val_set, digits.test_set):
        assert set(split.tensors[1].tolist()) == set(range(10))


def test_digits_can_repeat_grey_as_rgb() -> None:
    datamodule = DigitsDataModule(num_channels=3, image_size=16)
    datamodule.setup()
    images, _ = first_batch(datamodule.test_dataloader())
    assert images.shape[1:] == (3, 16, 16)
    assert torch.equal(images[:, 0], images[:, 2])


def test_batch_crop_draws_its_own_box_for_each_image() -> None:
    torch.manual_seed(0)
    images = torch.rand(1, 1, 16, 16).expand(8, 1, 16, 16)
    cropped = BatchRandomResizedCrop(scale=(0.3, 0.6), ratio=(0.75, 1.33))(images)
    assert cropped.shape == images.shape
    assert all(not torch.allclose(cropped[0], cropped[i]) for i in range(1, 8))


def test_batch_crop_of_the_whole_image_is_the_identity() -> None:
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    cropped = BatchRandomResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0))(images)
    torch.testing.assert_close(cropped, images)


# --- synthetic ---------------------------------------------------------------------


def test_synthetic_batches_follow_size_channels_and_classes() -> None:
    datamodule = SyntheticDataModule(
        batch_size=8,
        image_size=48,
        num_channels=2,
        num_classes=7,
        num_samples=16,
        num_eval_samples=8,
    )
    datamodule.setup()
    images, labels = first_batch(datamodule.train_dataloader())
    assert images.shape == (8, 2, 48, 48)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() < 7
    sizes = [len(s) for s in (datamodule.train_set, datamodule.val_set, datamodule.test_set)]
    assert sizes == [16, 8, 8]


# --- global batch ------------------------------------------------------------------


def test_global_batch_is_split_over_devices_and_accumulation() -> None:
    datamodule = SyntheticDataModule(batch_size=16, image_size=8, num_samples=32)
    datamodule.trainer = SimpleNamespace(world_size=2, accumulate_grad_batches=2)
    assert datamodule.per_device_batch_size == 4
    datamodule.setup()
    assert first_batch(datamodule.train_dataloader())[0].shape[0] == 4


def test_global_batch_without_trainer_is_the_loader_batch() -> None:
    assert SyntheticDataModule(batch_size=16).per_device_batch_size == 16


def test_global_batch_that_does_not_divide_names_every_number() -> None:
    datamodule = SyntheticDataModule(batch_size=10)
    datamodule.trainer = SimpleNamespace(world_size=2, accumulate_grad_batches=2)
    with pytest.raises(ConfigError) as err:
        _ = datamodule.per_device_batch_size
    message = str(err.value)
    for part in (
        "data.batch_size=10",
        "world size 2",
        "accumulate_grad_batches=2",
        "multiple of 4",
        "8 or 12",
    ):
        assert part in message


@pytest.mark.parametrize("loader", ["val_dataloader", "test_dataloader"])
def test_an_eval_set_smaller_than_the_world_is_refused_not_left_to_hang(loader) -> None:
    """Ranks past the last sample would have an empty loader: Lightning would stop them alone
    and the other ranks would fail on the lost connection. Every rank refuses it alike."""
    datamodule = SyntheticDataModule(batch_size=6, image_size=8, num_samples=12, num_eval_samples=2)
    datamodule.setup()
    datamodule.trainer = SimpleNamespace(world_size=3, global_rank=0, accumulate_grad_batches=1)
    split = "validation" if loader == "val_dataloader" else "test"
    with pytest.raises(
        ConfigError,
        match=rf"the {split} set has 2 samples, fewer than the 3 ranks .* use at most 2 devices",
    ):
        getattr(datamodule, loader)()
    datamodule.trainer = SimpleNamespace(world_size=2, global_rank=1, accumulate_grad_batches=1)
    assert len(all_labels(getattr(datamodule, loader)())) == 1


def test_eval_loaders_keep_every_sample_once() -> None:
    datamodule = SyntheticDataModule(
        batch_size=16, image_size=8, num_samples=32, num_eval_samples=37
    )
    datamodule.setup()
    labels = all_labels(datamodule.test_dataloader())
    assert torch.equal(labels, datamodule.test_set.tensors[1])


# --- CIFAR -------------------------------------------------------------------------


def write_fake_cifar10(root: Path, train_per_batch: int = 4, test_images: int = 6) -> None:
    """A `cifar-10-batches-py/` in the real pickle format, with a few random images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(name: str, count: int) -> None:
        batch = {
            "data": rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
            "labels": rng.integers(0, 10, count).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))

    for i in range(1, 6):
        write(f"data_batch_{i}", train_per_batch)
    write("test_batch", test_images)
    meta = {"label_names": [f"class_{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


@pytest.fixture
def skip_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks the md5 of every CIFAR file; the fake files only need to exist."""
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path)
    )


@pytest.mark.usefixtures("skip_cifar_md5")
def test_cifar10_loads_as_minus_one_to_one_nchw_at_image_size(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path)
    datamodule = CIFAR10DataModule(
        data_dir=str(tmp_path),
        batch_size=4,
        num_workers=0,
        image_size=48,
        pin_memory=False,
        val_size=5,
    )
    datamodule.prepare_data()
    datamodule.setup()
    assert [len(s) for s in (datamodule.train_set, datamodule.val_set, datamodule.test_set)] == [
        15,
        5,
        6,
    ]
    for loader in (datamodule.train_dataloader(), datamodule.test_dataloader()):
        images, labels = first_batch(loader)
        assert images.shape == (4, 3, 48, 48)
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.min() >= -1.0 and images.max() <= 1.0


def test_cifar10_missing_without_download_names_the_folder(tmp_path: Path) -> None:
    datamodule = CIFAR10DataModule(data_dir=str(tmp_path), download=False)
    datamodule.prepare_data()
    with pytest.raises(DataError) as err:
        datamodule.setup()
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)
    assert "data.download=true" in str(err.value)


def test_cifar10_failed_download_names_the_url_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(self: object) -> None:
        raise URLError("no internet")

    monkeypatch.setattr(torchvision.datasets.cifar.CIFAR10, "download", offline)
    datamodule = CIFAR10DataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DataError) as err:
        datamodule.prepare_data()
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)


def test_cifar10_rejects_a_wrong_class_count() -> None:
    with pytest.raises(ConfigError, match=re.escape("data.num_classes=100")):
        CIFAR10DataModule(num_classes=100)


# --- image folder ------------------------------------------------------------------


def write_image_folder(root: Path, splits: dict[str, list[str]], per_class: int = 2) -> None:
    """`root/<split>/<class>/<i>.png`, small random RGB PNGs."""
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def image_folder(root: Path, **kwargs: object) -> ImageFolderDataModule:
    options = {
        "batch_size": 2,
        "num_workers": 0,
        "image_size": 16,
        "num_classes": 2,
        "pin_memory": False,
    }
    return ImageFolderDataModule(data_dir=str(root), **{**options, **kwargs})


def test_image_folder_loads_pngs_as_minus_one_to_one_nchw(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    datamodule = image_folder(tmp_path)
    datamodule.setup()
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader()):
        images, labels = first_batch(loader)
        assert images.shape == (2, 3, 16, 16)
        assert images.min() >= -1.0 and images.max() <= 1.0
        assert labels.dtype == torch.int64


def test_image_folder_uses_val_as_test_without_a_test_folder(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]}, per_class=3)
    datamodule = image_folder(tmp_path)
    datamodule.setup("test")
    assert datamodule.test_set.root == str(tmp_path / "val")
    assert len(all_labels(datamodule.test_dataloader())) == 6


def test_image_folder_missing_names_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        image_folder(tmp_path / "nowhere").setup()
    assert str(tmp_path / "nowhere" / "train") in str(err.value)
    assert "<class>" in str(err.value)


def test_image_folder_without_class_folders_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        image_folder(tmp_path).setup()


def test_image_folder_with_empty_class_folders_is_a_data_error(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
    with pytest.raises(DataError, match="no usable images"):
        image_folder(tmp_path).setup()


def test_image_folder_names_classes_that_differ_between_splits(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "emu"]})
    with pytest.raises(DataError) as err:
        image_folder(tmp_path).setup()
    assert "only in train: ['dog']" in str(err.value)
    assert "only in val: ['emu']" in str(err.value)


def test_image_folder_unreadable_image_names_the_file(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    broken = tmp_path / "val" / "dog" / "broken.png"
    broken.write_bytes(b"not a png")
    datamodule = image_folder(tmp_path)
    datamodule.setup()
    with pytest.raises(DataError, match=re.escape(str(broken))):
        all_labels(datamodule.val_dataloader())


def test_image_folder_class_count_must_match_num_classes(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    with pytest.raises(ConfigError, match=re.escape("set data.num_classes=2")):
        image_folder(tmp_path, num_classes=1000).setup()


# --- configs -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "synthetic", "cifar10", "cifar100", "image_folder"])
def test_every_data_config_builds_its_datamodule(name: str, tmp_path: Path) -> None:
    cfg = OmegaConf.create(
        {"paths": {"data_dir": str(tmp_path)}, "data": OmegaConf.load(CONF_DATA / f"{name}.yaml")}
    )
    datamodule = hydra.utils.instantiate(cfg.data)
    assert datamodule.image_size == cfg.data.image_size
    assert datamodule.num_channels == cfg.data.num_channels
    assert datamodule.num_classes == cfg.data.num_classes
    assert datamodule.batch_size == cfg.data.batch_size
