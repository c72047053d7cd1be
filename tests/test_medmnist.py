"""MedMNIST: the official `.npz` layout, the table of sets, the errors users see, one run end to end.

Every file here is generated in `tmp_path` with the release's layout (uint8 images
(n, h, w) or (n, h, w, 3), labels (n, 1)); nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import get_args

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from vitlab.data import MedMNISTDataModule
from vitlab.data.medmnist import MEDMNIST_SETS, MedMNISTFlag
from vitlab.errors import ConfigError, DataError
from vitlab.runs.classes import fill_num_classes
from vitlab.runs.tasks import train

CONF_MEDMNIST = Path(__file__).resolve().parents[1] / "conf" / "data" / "medmnist.yaml"
SPLIT_SIZES = {"train": 12, "val": 6, "test": 6}


def write_npz(
    path: Path, num_classes: int = 2, rgb: bool = False, size: int = 28, **replace: np.ndarray
) -> dict[str, np.ndarray]:
    """A MedMNIST-layout file of random images and labels at `path`; `replace` swaps arrays."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in SPLIT_SIZES.items():
        shape = (count, size, size, 3) if rgb else (count, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, num_classes, (count, 1), dtype=np.uint8)
    arrays.update(replace)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def medmnist(data_dir: Path, **kwargs: object) -> MedMNISTDataModule:
    return MedMNISTDataModule(data_dir=str(data_dir), batch_size=4, **kwargs)


def eval_batch(datamodule: MedMNISTDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    datamodule.setup()
    return next(iter(datamodule.test_dataloader()))


# --- reading the official layout ---------------------------------------------------


def test_a_grey_28_file_gives_float_batches_in_minus_one_to_one(tmp_path):
    write_npz(tmp_path / "pneumoniamnist.npz")
    datamodule = medmnist(tmp_path)
    datamodule.setup()
    for loader in (datamodule.train_dataloader(), datamodule.test_dataloader()):
        images, labels = next(iter(loader))
        assert images.shape == (4, 3, 28, 28) and images.dtype == torch.float32
        assert images.min() >= -1.0 and images.max() <= 1.0
        assert labels.shape == (4,) and labels.dtype == torch.int64


def test_eval_pixels_are_the_files_grey_values_repeated_in_three_channels(tmp_path):
    arrays = write_npz(tmp_path / "pneumoniamnist.npz")
    images, labels = eval_batch(medmnist(tmp_path))
    expected = torch.from_numpy(arrays["test_images"][:4]).float() / 127.5 - 1.0
    for channel in range(3):
        torch.testing.assert_close(images[:, channel], expected)
    assert labels.tolist() == arrays["test_labels"][:4, 0].tolist()


def test_an_rgb_64_file_is_read_from_flag_underscore_size(tmp_path):
    write_npz(tmp_path / "pathmnist_64.npz", num_classes=9, rgb=True, size=64)
    images, _ = eval_batch(medmnist(tmp_path, flag="pathmnist", size=64))
    assert images.shape == (4, 3, 64, 64)


def test_rgb_turns_to_one_grey_channel_when_asked(tmp_path):
    arrays = write_npz(tmp_path / "pathmnist.npz", num_classes=9, rgb=True)
    images, _ = eval_batch(medmnist(tmp_path, flag="pathmnist", num_channels=1))
    red, green, blue = np.moveaxis(arrays["test_images"][:4].astype(np.float32), -1, 0)
    luma = torch.from_numpy(0.2989 * red + 0.587 * green + 0.114 * blue) / 127.5 - 1.0
    assert images.shape == (4, 1, 28, 28)
    torch.testing.assert_close(images[:, 0], luma, atol=1e-3, rtol=0)


def test_image_size_resamples_the_files_size(tmp_path):
    write_npz(tmp_path / "pneumoniamnist.npz")
    datamodule = medmnist(tmp_path, image_size=32)
    datamodule.setup()
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader()):
        assert next(iter(loader))[0].shape == (4, 3, 32, 32)


def test_the_splits_are_the_files_own(tmp_path):
    write_npz(tmp_path / "pneumoniamnist.npz")
    datamodule = medmnist(tmp_path)
    datamodule.setup()
    sizes = {split: len(getattr(datamodule, f"{split}_set")) for split in SPLIT_SIZES}
    assert sizes == SPLIT_SIZES


def test_folds_cut_train_and_val_together_and_leave_test(tmp_path):
    write_npz(tmp_path / "pneumoniamnist.npz")
    datamodule = medmnist(tmp_path, num_folds=3, fold=1)
    datamodule.setup()
    pool = SPLIT_SIZES["train"] + SPLIT_SIZES["val"]
    assert len(datamodule.train_set) + len(datamodule.val_set) == pool
    assert len(datamodule.val_set) == pool // 3
    assert len(datamodule.test_set) == SPLIT_SIZES["test"]


# --- the table of sets -------------------------------------------------------------


def test_the_flag_choices_are_the_table():
    assert get_args(MedMNISTFlag) == tuple(MEDMNIST_SETS)


def test_num_classes_and_names_come_from_the_flag_without_the_file(tmp_path):
    datamodule = medmnist(tmp_path / "absent", flag="organamnist")
    assert datamodule.num_classes == 11
    assert datamodule.class_names[:3] == ["bladder", "femur-left", "femur-right"]


def test_a_num_classes_that_disagrees_with_the_flag_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("set data.num_classes=9")):
        medmnist(tmp_path, flag="pathmnist", num_classes=10)


def test_multi_label_chestmnist_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"data.flag='chestmnist' is multi-label.*single-label"):
        medmnist(tmp_path, flag="chestmnist")


def test_an_unknown_flag_lists_the_single_label_sets(tmp_path):
    with pytest.raises(
        ConfigError, match=r"data.flag='nodulemnist3d'.*volumes.*pneumoniamnist"
    ) as err:
        medmnist(tmp_path, flag="nodulemnist3d")
    assert "chestmnist" not in str(err.value)


# --- files that are missing or wrong ----------------------------------------------


def test_a_file_that_is_not_an_npz_says_to_download_it_again(tmp_path):
    (tmp_path / "pneumoniamnist.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=r"Cannot read .*pneumoniamnist.npz.*download it again"):
        medmnist(tmp_path).setup()


def test_a_missing_file_names_the_path_and_the_download_address(tmp_path):
    with pytest.raises(DataError) as err:
        medmnist(tmp_path, flag="dermamnist", size=128).setup()
    message = str(err.value)
    assert str(tmp_path / "dermamnist_128.npz") in message
    assert "https://zenodo.org/records/10519652/files/dermamnist_128.npz?download=1" in message


def test_a_file_without_the_layouts_keys_names_the_missing_ones(tmp_path):
    np.savez(tmp_path / "pneumoniamnist.npz", images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"lacks train_images, train_labels.*it holds images"):
        medmnist(tmp_path).setup()


def test_images_of_another_size_say_to_set_data_size(tmp_path):
    write_npz(tmp_path / "pneumoniamnist.npz", size=64)
    with pytest.raises(DataError, match=r"train_images are 64x64 but data.size=28"):
        medmnist(tmp_path).setup()


def test_grey_images_for_an_rgb_set_are_refused(tmp_path):
    write_npz(tmp_path / "bloodmnist.npz", num_classes=8)
    with pytest.raises(DataError, match=r"train_images are grey but bloodmnist is RGB"):
        medmnist(tmp_path, flag="bloodmnist").setup()


def test_labels_out_of_range_are_refused(tmp_path):
    write_npz(tmp_path / "pneumoniamnist.npz", val_labels=np.full((6, 1), 2, np.uint8))
    with pytest.raises(
        DataError, match=r"val_labels range over 2..2 but pneumoniamnist has labels 0..1"
    ):
        medmnist(tmp_path).setup()


def test_several_labels_per_image_are_refused(tmp_path):
    write_npz(tmp_path / "pneumoniamnist.npz", train_labels=np.zeros((12, 14), np.uint8))
    with pytest.raises(DataError, match=re.escape("train_labels are uint8 of shape (12, 14)")):
        medmnist(tmp_path).setup()


# --- the config --------------------------------------------------------------------


def test_the_config_builds_without_the_file_at_the_files_size(tmp_path):
    data = OmegaConf.load(CONF_MEDMNIST)
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "data": data})
    datamodule = hydra.utils.instantiate(cfg.data, size=64)
    assert (datamodule.image_size, datamodule.num_classes) == (64, 2)
    assert datamodule.path == tmp_path / "medmnist" / "pneumoniamnist_64.npz"


def test_the_run_fills_num_classes_from_the_flag(make_cfg):
    cfg = make_cfg("data=medmnist", "data.flag=dermamnist")
    fill_num_classes(cfg)
    assert cfg.model.num_classes == 7


def test_data_medmnist_trains_end_to_end(make_cfg, tmp_path):
    write_npz(tmp_path / "data" / "medmnist" / "octmnist.npz", num_classes=4)
    cfg = make_cfg(
        "data=medmnist",
        "data.flag=octmnist",
        "data.batch_size=4",
        "trainer.max_epochs=1",
        "scheduler.warmup_steps=0",
        "callbacks.progress_bar=null",
        "callbacks.throughput=null",
    )
    train(cfg)
    assert "test/acc" in json.loads((tmp_path / "metrics.json").read_text())
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["class_names"] == list(
        MEDMNIST_SETS["octmnist"].class_names
    )
