"""`PerClassResults`: after test, per-class accuracy, the confusion matrix and the most
confidently wrong images, in the run folder and for every logger."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import lightning as L
import pytest
import torch
import wandb
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vitlab.runs.build import build_trainer
from vitlab.runs.tasks import train
from vitlab.training import per_class
from vitlab.training.classifier import ImageClassifier
from vitlab.training.loggers import CSVLogger
from vitlab.training.per_class import PerClassResults

# The callback turns a failure to write into a warning; here it must fail the test instead.
pytestmark = pytest.mark.filterwarnings("error:PerClassResults wrote no")

NAMES = ["ant", "bee", "cat"]
# Each test image is (3, 1, 1) and the backbone `nn.Flatten`: an image's three pixels are the
# model's logits, so the test knows every prediction and its probability.
LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
LOGITS = torch.tensor(
    [
        [1.0, -1.0, -1.0],  # ant, right
        [-1.0, 1.0, -1.0],  # ant -> bee, p 0.79
        [0.2, 0.1, 0.0],  # ant, right
        [-1.0, 1.0, -1.0],  # bee, right
        [0.5, 0.0, -1.0],  # bee -> ant, p 0.55
        [-1.0, -1.0, 0.9],  # bee -> cat, p 0.77
        [-1.0, -1.0, 1.0],  # cat, right
        [0.0, 0.3, 0.0],  # cat -> bee, p 0.40
        [0.8, -1.0, -1.0],  # cat -> ant, p 0.75, in the last batch
        [-1.0, -1.0, 1.0],  # cat, right
    ]
)
# The three most confidently wrong, most confident first, as the grid titles them.
TOP_3_WRONG = ["ant → bee (0.79)", "bee → cat (0.77)", "cat → ant (0.75)"]
BATCH_SIZE = 4


def run_test(
    folder: Path,
    logits: torch.Tensor = LOGITS,
    class_names: list[str] | None = NAMES,
    loggers: list[Any] | None = None,
    num_wrong: int = 3,
) -> None:
    model = ImageClassifier(nn.Flatten(), num_classes=3, class_names=class_names)
    images = logits.reshape(len(logits), 3, 1, 1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=loggers or False,
        callbacks=[PerClassResults(dirpath=str(folder), num_wrong=num_wrong)],
        default_root_dir=folder,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(TensorDataset(images, LABELS[: len(logits)]), batch_size=BATCH_SIZE)
    trainer.test(model, dataloaders=loader, verbose=False)


def record_grids(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Every image grid the callback draws from now on, in order."""
    grids = []
    draw = per_class.most_confident_wrong_figure

    def drawing(*args: Any) -> Figure:
        grids.append(draw(*args))
        return grids[-1]

    monkeypatch.setattr(per_class, "most_confident_wrong_figure", drawing)
    return grids


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as file:
        return list(csv.reader(file))


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One test of the controlled model, with the CSV, TensorBoard and W&B loggers (W&B's run
    a mock, so nothing starts); returns the run folder, the W&B mock and the grid drawn."""
    folder = tmp_path_factory.mktemp("per_class")
    run = MagicMock()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WandbLogger, "experiment", property(lambda self: run))
        grids = record_grids(patch)
        loggers = [
            CSVLogger(save_dir=folder, name="csv", version=""),
            TensorBoardLogger(save_dir=folder / "tensorboard", name="", version=""),
            WandbLogger(save_dir=folder, offline=True),
        ]
        run_test(folder, loggers=loggers)
    return {"folder": folder, "wandb": run, "grids": grids}


def test_per_class_csv_counts_each_class_as_the_predictions_do(logged):
    predicted = LOGITS.argmax(dim=-1)
    rows = read_csv(logged["folder"] / "per_class.csv")
    assert rows[0] == ["class", "name", "test_images", "correct", "accuracy"]
    for c, (index, _, images, correct, accuracy) in enumerate(rows[1:]):
        of_class = LABELS.eq(c)
        right = int((of_class & (predicted == c)).sum())
        assert (int(index), int(images), int(correct)) == (c, int(of_class.sum()), right)
        assert float(accuracy) == pytest.approx(right / int(of_class.sum()))


def test_confusion_matrix_csv_counts_true_against_predicted_over_the_whole_test_set(logged):
    rows = read_csv(logged["folder"] / "confusion_matrix.csv")
    counts = torch.tensor([[int(count) for count in row[1:]] for row in rows[1:]])
    expected = torch.zeros(3, 3, dtype=torch.long)
    for true, predicted in zip(LABELS.tolist(), LOGITS.argmax(dim=-1).tolist(), strict=True):
        expected[true, predicted] += 1
    assert torch.equal(counts, expected)
    assert counts.sum() == len(LABELS)


def test_the_files_name_the_classes(logged):
    assert [row[1] for row in read_csv(logged["folder"] / "per_class.csv")[1:]] == NAMES
    confusion = read_csv(logged["folder"] / "confusion_matrix.csv")
    assert confusion[0][1:] == NAMES
    assert [row[0] for row in confusion[1:]] == NAMES


def test_both_figures_are_written_as_png(logged):
    for file in ("confusion_matrix.png", "most_confident_wrong.png"):
        assert (logged["folder"] / file).read_bytes().startswith(b"\x89PNG")


def test_the_grid_shows_the_most_confidently_wrong_images_of_all_batches_first_to_last(logged):
    (grid,) = logged["grids"]
    assert [text.get_text() for text in grid.axes[0].texts] == TOP_3_WRONG


def test_tensorboard_gets_both_figures_and_the_per_class_table(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged["folder"] / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"test/confusion_matrix", "test/most_confident_wrong"} <= set(tags["images"])
    assert "test/per_class_accuracy/text_summary" in tags["tensors"]


def test_wandb_gets_the_per_class_table_and_both_images(logged):
    logged_values = {}
    for call in logged["wandb"].log.call_args_list:
        logged_values.update(call.args[0])
    table = logged_values["test/per_class_accuracy"]
    assert isinstance(table, wandb.Table)
    assert [row[1] for row in table.data] == NAMES
    for key in ("test/confusion_matrix", "test/most_confident_wrong"):
        (image,) = logged_values[key]
        assert isinstance(image, wandb.Image)


def test_a_grid_with_fewer_wrong_images_than_num_wrong_shows_every_wrong_one(tmp_path, monkeypatch):
    grids = record_grids(monkeypatch)
    run_test(tmp_path, num_wrong=16)
    (grid,) = grids
    titles = [text.get_text() for text in grid.axes[0].texts]
    assert titles == [*TOP_3_WRONG, "bee → ant (0.55)", "cat → bee (0.40)"]


@pytest.fixture(scope="module")
def all_right(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test of a model that gets every image right and knows no class names."""
    folder = tmp_path_factory.mktemp("all_right")
    run_test(folder, logits=torch.nn.functional.one_hot(LABELS, 3).float(), class_names=None)
    return folder


def test_a_model_with_no_wrong_prediction_writes_the_tables_and_no_grid(all_right):
    rows = read_csv(all_right / "per_class.csv")[1:]
    assert [float(row[4]) for row in rows] == [1.0, 1.0, 1.0]
    assert (all_right / "confusion_matrix.png").is_file()
    assert not (all_right / "most_confident_wrong.png").exists()


def test_without_class_names_the_classes_are_named_by_their_index(all_right):
    assert read_csv(all_right / "confusion_matrix.csv")[0][1:] == ["0", "1", "2"]


def test_a_failure_to_write_is_a_warning_and_the_test_completes(tmp_path, monkeypatch):
    def failing(*args: Any) -> Figure:
        raise OSError("No space left on device")

    monkeypatch.setattr(per_class, "confusion_matrix_figure", failing)
    with pytest.warns(UserWarning, match="PerClassResults wrote no .*No space left on device"):
        run_test(tmp_path)


def test_num_wrong_below_zero_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"callbacks.per_class.num_wrong=-1 must be >= 0"):
        PerClassResults(num_wrong=-1)


def test_a_debug_run_writes_the_results_into_its_run_folder(make_cfg, tmp_path):
    train(make_cfg("debug=fdr"))
    rows = read_csv(tmp_path / "per_class.csv")[1:]
    assert [row[1] for row in rows] == [str(digit) for digit in range(10)]
    assert (tmp_path / "confusion_matrix.png").is_file()


@pytest.mark.parametrize("config_name", ["train", "eval"])
def test_train_and_eval_configure_the_callback_into_the_run_folder(make_cfg, tmp_path, config_name):
    overrides = ["ckpt_path=unused.ckpt"] if config_name == "eval" else []
    trainer = build_trainer(make_cfg(*overrides, config_name=config_name))
    (callback,) = [c for c in trainer.callbacks if isinstance(c, PerClassResults)]
    assert callback.dirpath == str(tmp_path)


def test_callbacks_per_class_null_turns_it_off(make_cfg):
    trainer = build_trainer(make_cfg("callbacks.per_class=null"))
    assert not [c for c in trainer.callbacks if isinstance(c, PerClassResults)]
