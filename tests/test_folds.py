"""Cross-validation (`data.num_folds`, `data.fold`): the split, the datamodules, the config."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_data import (
    skip_cifar_md5,  # noqa: F401 (a fixture, used by name)
    write_fake_cifar10,
    write_image_folder,
)
from vitlab.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
)
from vitlab.data.folds import fold_indices
from vitlab.errors import ConfigError
from vitlab.runs.build import instantiate
from vitlab.runs.validate import check_run

# Three classes of unequal size, in no particular order.
LABELS = np.random.default_rng(0).permutation(np.repeat([0, 1, 2], [23, 11, 7]))


def held_out_folds(labels: np.ndarray, num_folds: int, seed: int = 0) -> list[np.ndarray]:
    return [fold_indices(labels, num_folds, fold, seed)[1] for fold in range(num_folds)]


# --- the split ---------------------------------------------------------------------


def test_the_held_out_folds_are_disjoint_and_cover_the_pool() -> None:
    folds = held_out_folds(LABELS, 4)
    assert np.array_equal(np.sort(np.concatenate(folds)), np.arange(len(LABELS)))


def test_a_fold_trains_on_every_image_it_does_not_hold_out() -> None:
    train, val = fold_indices(LABELS, 4, 2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(LABELS)))
    assert not set(train.tolist()) & set(val.tolist())


def test_each_fold_holds_every_class_in_proportion_to_within_one_image() -> None:
    counts = np.array(
        [np.bincount(LABELS[fold], minlength=3) for fold in held_out_folds(LABELS, 4)]
    )
    assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all()


def test_the_folds_depend_on_the_split_seed_and_not_on_the_global_seed() -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    first = held_out_folds(LABELS, 4, seed=0)
    torch.manual_seed(2)
    np.random.seed(2)
    again = held_out_folds(LABELS, 4, seed=0)
    other_seed = held_out_folds(LABELS, 4, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other_seed, strict=True))


def test_more_folds_than_images_in_any_class_is_refused() -> None:
    with pytest.raises(ConfigError, match=re.escape("data.num_folds=3 is more than the 2 images")):
        fold_indices([0, 0, 1, 1], 3, 0, seed=0)


@pytest.mark.parametrize(
    ("num_folds", "fold", "message"),
    [
        (1, 0, "data.num_folds=1 must be an integer >= 2"),
        (5, 5, "data.fold=5 is not a fold of data.num_folds=5; use data.fold in 0..4"),
        (None, 2, "data.fold=2 needs data.num_folds, which is null"),
        (5, -1, "data.fold=-1 must be an integer >= 0"),
    ],
)
def test_bad_fold_settings_are_refused_naming_the_keys(
    num_folds: int | None, fold: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        DigitsDataModule(num_folds=num_folds, fold=fold)


# --- the datamodules ---------------------------------------------------------------


def digits(**kwargs: object) -> DigitsDataModule:
    datamodule = DigitsDataModule(image_size=8, **kwargs)
    datamodule.setup()
    return datamodule


def test_digits_test_set_does_not_move_with_the_folds() -> None:
    usual, fold = digits(), digits(num_folds=5, fold=3)
    assert all(
        torch.equal(a, b)
        for a, b in zip(usual.test_set.tensors, fold.test_set.tensors, strict=True)
    )


def test_digits_folds_cut_every_image_outside_the_test_set() -> None:
    pool = 1797 - 300
    folds = [digits(num_folds=5, fold=fold) for fold in range(5)]
    assert all(len(d.train_set) + len(d.val_set) == pool for d in folds)
    assert sum(len(d.val_set) for d in folds) == pool


@pytest.fixture
def fake_cifar10(tmp_path: Path) -> Path:
    write_fake_cifar10(tmp_path, train_per_batch=16, test_images=6)
    return tmp_path


def cifar10(root: Path, **kwargs: object) -> CIFAR10DataModule:
    return CIFAR10DataModule(
        data_dir=str(root), download=False, image_size=8, pin_memory=False, **kwargs
    )


@pytest.mark.usefixtures("skip_cifar_md5")
def test_cifar_validates_on_the_held_out_fold_of_the_train_images(fake_cifar10: Path) -> None:
    # val_size=1000 is more than the 80 fake train images: refused were it used.
    datamodule = cifar10(fake_cifar10, num_folds=3, fold=1, val_size=1000)
    datamodule.setup("fit")
    targets = datamodule.train_set.dataset.dataset.targets
    train, val = fold_indices(targets, 3, 1, seed=0)
    assert np.array_equal(datamodule.train_set.dataset.indices, train)
    assert np.array_equal(datamodule.val_set.dataset.indices, val)
    assert datamodule.train_set.transform is datamodule.train_transform
    assert datamodule.val_set.transform is datamodule.eval_transform


@pytest.mark.usefixtures("skip_cifar_md5")
def test_cifar_tests_on_the_official_test_set_with_folds(fake_cifar10: Path) -> None:
    usual, fold = cifar10(fake_cifar10), cifar10(fake_cifar10, num_folds=3, fold=2)
    for datamodule in (usual, fold):
        datamodule.setup("test")
    assert len(fold.test_set) == 6
    assert np.array_equal(fold.test_set.dataset.data, usual.test_set.dataset.data)


def image_folder(root: Path, **kwargs: object) -> ImageFolderDataModule:
    return ImageFolderDataModule(
        data_dir=str(root), image_size=8, num_workers=0, pin_memory=False, **kwargs
    )


def test_image_folder_folds_cut_train_and_validate_with_the_eval_transform(
    tmp_path: Path,
) -> None:
    write_image_folder(tmp_path, {"train": ["cat", "dog"]}, per_class=5)
    datamodule = image_folder(tmp_path, num_folds=5, fold=2)
    datamodule.setup("fit")
    assert (len(datamodule.train_set), len(datamodule.val_set)) == (8, 2)
    assert datamodule.val_set.dataset.root == str(tmp_path / "train")
    assert datamodule.train_set.dataset.transform is datamodule.train_transform
    assert datamodule.val_set.dataset.transform is datamodule.eval_transform


def test_image_folder_folds_keep_val_as_the_test_set_without_test(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]}, per_class=5)
    datamodule = image_folder(tmp_path, num_folds=5, fold=0)
    datamodule.setup()
    assert datamodule.test_set.root == str(tmp_path / "val")


def test_synthetic_folds_cut_the_train_split_and_keep_the_test_split() -> None:
    options = {"image_size": 4, "num_classes": 4, "num_samples": 40, "num_eval_samples": 8}
    usual = SyntheticDataModule(**options)
    fold = SyntheticDataModule(num_folds=4, fold=1, **options)
    for datamodule in (usual, fold):
        datamodule.setup()
    assert len(fold.train_set) + len(fold.val_set) == 40
    assert torch.equal(fold.test_set.tensors[0], usual.test_set.tensors[0])


# --- the config --------------------------------------------------------------------


def test_a_fold_of_a_study_passes_the_run_check(make_cfg) -> None:
    cfg = make_cfg("data.num_folds=5", "data.fold=4")
    check_run(cfg)
    datamodule = instantiate(cfg.data, "data")
    assert (datamodule.num_folds, datamodule.fold) == (5, 4)


def test_one_fold_is_refused_by_the_run_check(make_cfg) -> None:
    with pytest.raises(ConfigError, match=re.escape("data.num_folds=1 is not valid")):
        check_run(make_cfg("data.num_folds=1"))


def test_a_fold_past_the_last_is_refused_before_the_data_loads(make_cfg) -> None:
    cfg = make_cfg("data.num_folds=5", "data.fold=5")
    with pytest.raises(ConfigError, match=re.escape("use data.fold in 0..4")):
        instantiate(cfg.data, "data")


def test_a_fold_past_the_last_is_refused_by_the_run_check(make_cfg) -> None:
    with pytest.raises(ConfigError, match=re.escape("use data.fold in 0..4")):
        check_run(make_cfg("data.num_folds=5", "data.fold=5"))


def test_a_fold_without_folds_is_refused_by_the_run_check(make_cfg) -> None:
    with pytest.raises(ConfigError, match=re.escape("data.fold=2 needs data.num_folds")):
        check_run(make_cfg("data.fold=2"))
