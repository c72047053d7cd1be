"""The data knows its classes: image folders count theirs, datamodules name them, checkpoints keep the names."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_vit
from tests.test_data import write_image_folder
from vitlab.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
)
from vitlab.errors import ConfigError, DataError
from vitlab.runs.classes import fill_num_classes
from vitlab.runs.tasks import train
from vitlab.training.classifier import ImageClassifier

CLASSES = ["cat", "dog"]


def write_pngs(root: Path, classes: list[str] = CLASSES, per_class: int = 2) -> Path:
    """`root/{train,val}/<class>/<i>.png`: tiny random RGB images."""
    write_image_folder(root, {"train": classes, "val": classes}, per_class)
    return root


def image_folder(root: Path, **kwargs: object) -> ImageFolderDataModule:
    options = {"batch_size": 2, "num_workers": 0, "image_size": 16, "pin_memory": False}
    return ImageFolderDataModule(data_dir=str(root), **{**options, **kwargs})


# --- image folders count their classes --------------------------------------------


def test_image_folder_without_num_classes_takes_the_folder_count_in_setup(tmp_path):
    datamodule = image_folder(write_pngs(tmp_path, ["ant", "bee", "cat"]))
    assert datamodule.num_classes is None, "construction does not read the disk"
    datamodule.setup()
    assert datamodule.num_classes == 3


def test_image_folder_construction_does_not_need_the_folder(tmp_path):
    datamodule = image_folder(tmp_path / "not_yet")
    assert datamodule.num_classes is None


def test_image_folder_refuses_a_num_classes_that_disagrees_with_the_folders(tmp_path):
    datamodule = image_folder(write_pngs(tmp_path), num_classes=5)
    with pytest.raises(ConfigError) as err:
        datamodule.setup()
    message = str(err.value)
    assert "data.num_classes=5" in message
    assert "has 2 class folders" in message and "set data.num_classes=2" in message


def test_image_folder_refuses_a_num_classes_that_is_not_positive(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("data.num_classes=0")):
        image_folder(write_pngs(tmp_path), num_classes=0)


def test_find_classes_lists_the_train_folders_sorted(tmp_path):
    write_pngs(tmp_path, ["zebra", "ant", "moth"])
    assert ImageFolderDataModule.find_classes(tmp_path) == ["ant", "moth", "zebra"]


def test_find_classes_without_train_names_the_folder_and_the_layout(tmp_path):
    with pytest.raises(DataError) as err:
        ImageFolderDataModule.find_classes(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "train") in str(err.value)
    assert "<class>" in str(err.value)


def test_find_classes_of_an_empty_train_folder_names_it(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderDataModule.find_classes(tmp_path)


def test_image_folder_mixing_gets_the_counted_classes(tmp_path):
    datamodule = image_folder(write_pngs(tmp_path), mixup_alpha=0.2)
    datamodule.setup("fit")
    _, soft_labels = next(iter(datamodule.train_dataloader()))
    assert soft_labels.shape == (2, 2)


# --- each datamodule names its classes ---------------------------------------------


def test_image_folder_class_names_are_the_folder_names(tmp_path):
    assert image_folder(write_pngs(tmp_path)).class_names == CLASSES


def test_digits_class_names_are_the_digits():
    assert DigitsDataModule().class_names == [str(d) for d in range(10)]


def test_cifar10_class_names_are_torchvisions():
    assert CIFAR10DataModule().class_names == [
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
    ]


def test_cifar100_class_names_come_from_the_downloaded_meta(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"fine_{i}" for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names}))
    assert CIFAR100DataModule(data_dir=str(tmp_path)).class_names == names


def test_cifar100_class_names_are_none_before_the_download(tmp_path):
    assert CIFAR100DataModule(data_dir=str(tmp_path)).class_names is None


def test_synthetic_data_has_no_class_names():
    assert SyntheticDataModule(num_classes=3).class_names is None


# --- the classifier keeps them -----------------------------------------------------


def test_classifier_saves_class_names_as_a_plain_list():
    model = ImageClassifier(tiny_vit(num_classes=2), num_classes=2, class_names=("cat", "dog"))
    assert model.hparams.class_names == ["cat", "dog"]


def test_classifier_refuses_class_names_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"class_names has 3 names but num_classes=2"):
        ImageClassifier(tiny_vit(num_classes=2), num_classes=2, class_names=["a", "b", "c"])


# --- the run fills the count before building the model -----------------------------


def test_fill_num_classes_counts_the_folders_of_a_composed_config(make_cfg, tmp_path):
    root = write_pngs(tmp_path / "pets")
    cfg = make_cfg("data=image_folder", f"data.data_dir={root}")
    assert cfg.data.num_classes is None
    fill_num_classes(cfg)
    assert cfg.data.num_classes == 2
    assert cfg.model.num_classes == 2, "the model reads ${data.num_classes}"


def test_fill_num_classes_resolves_the_data_dir_interpolation(make_cfg, tmp_path):
    write_pngs(tmp_path / "data" / "imagenet")  # image_folder's default: ${paths.data_dir}/imagenet
    cfg = make_cfg("data=image_folder")
    fill_num_classes(cfg)
    assert cfg.data.num_classes == 2


def test_fill_num_classes_keeps_a_given_number(make_cfg, tmp_path):
    cfg = make_cfg(
        "data=image_folder", f"data.data_dir={tmp_path / 'absent'}", "data.num_classes=7"
    )
    fill_num_classes(cfg)
    assert cfg.data.num_classes == 7


def test_fill_num_classes_of_a_missing_folder_names_it(make_cfg, tmp_path):
    cfg = make_cfg("data=image_folder", f"data.data_dir={tmp_path / 'absent'}")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "absent" / "train"))):
        fill_num_classes(cfg)


def test_fill_num_classes_refuses_none_for_data_that_cannot_count(make_cfg):
    cfg = make_cfg("data=synthetic", "data.num_classes=null")
    with pytest.raises(ConfigError, match=re.escape("set data.num_classes=<n>")):
        fill_num_classes(cfg)


# --- end to end --------------------------------------------------------------------


def test_training_on_image_folders_saves_the_class_names_in_the_checkpoint(make_cfg, tmp_path):
    """Needs the runs layer wired: `fill_num_classes` in `train`, `class_names` in `build_classifier`."""
    root = write_pngs(tmp_path / "pets")
    cfg = make_cfg(
        "data=image_folder",
        f"data.data_dir={root}",
        "trainer.max_epochs=1",
        "data.batch_size=2",
        "data.image_size=16",
        "data.num_workers=0",
        "data.pin_memory=false",
        "model.patch_size=4",
        "scheduler.warmup_steps=0",
        "callbacks.progress_bar=null",
        "callbacks.throughput=null",
    )
    train(cfg)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["class_names"] == CLASSES
    assert checkpoint["hyper_parameters"]["num_classes"] == 2
