"""`vitlab.runs.tasks.train` / `evaluate` end to end on CPU, in-process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning
import pytest
import torch

from vitlab.errors import ConfigError, DataError
from vitlab.runs.build import build_classifier
from vitlab.runs.folders import unique_dir
from vitlab.runs.tasks import evaluate, train

QUICK = (
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "scheduler.warmup_steps=1",
)


@pytest.mark.parametrize("shorter", ["trainer.max_epochs=1", "trainer.max_steps=3"])
def test_a_shorter_run_trains_on_the_default_config(make_cfg, tmp_path, shorter):
    """A newcomer's first edit: the default warmup (100 steps) is cut to the run, with a warning."""
    with pytest.warns(
        UserWarning, match=r"scheduler.warmup_steps=100 is more than the \d+ optimizer steps"
    ):
        train(make_cfg(shorter, "callbacks.progress_bar=null"))
    assert json.loads((tmp_path / "metrics.json").read_text())["test/acc"] >= 0.0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_fast_dev_run_trains_and_tests_one_batch(make_cfg, tmp_path):
    cfg = make_cfg("debug=fdr")
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"train/loss", "test/acc", "test/acc_top5"} <= set(metrics)


def test_train_returns_the_optimized_metric_and_writes_metrics_json(make_cfg, tmp_path):
    cfg = make_cfg(*QUICK)
    value = train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert value == pytest.approx(metrics["val/acc"])
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "csv" / "metrics.csv").is_file()


def test_eval_of_the_best_checkpoint_reproduces_the_test_accuracy(make_cfg, tmp_path):
    train_metrics = train(make_cfg(*QUICK)) and json.loads((tmp_path / "metrics.json").read_text())
    best = next((tmp_path / "checkpoints").glob("epoch_*.ckpt"))
    eval_cfg = make_cfg(f"ckpt_path={best}", config_name="eval")
    eval_metrics = evaluate(eval_cfg)
    assert eval_metrics["test/acc"] == pytest.approx(train_metrics["test/acc"], abs=1e-6)


def test_eval_changes_one_field_of_the_saved_data_config(make_cfg, tmp_path):
    train(make_cfg("debug=fdr", "trainer.fast_dev_run=false", *QUICK))
    eval_cfg = make_cfg(
        f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}",
        "+data.batch_size=50",
        config_name="eval",
    )
    evaluate(eval_cfg)
    assert eval_cfg.data.batch_size == 50
    assert eval_cfg.data._target_ == "vitlab.data.DigitsDataModule", (
        "the rest comes from the checkpoint"
    )


def test_eval_of_a_checkpoint_from_before_the_loss_key_keeps_its_label_smoothing(
    make_cfg, tmp_path
):
    train(make_cfg("debug=fdr", "trainer.fast_dev_run=false", *QUICK))
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    config = checkpoint["hyper_parameters"]["config"]
    config["classifier"] = {"label_smoothing": 0.1}  # the old name of the `loss` node
    del config["loss"]
    torch.save(checkpoint, path)
    eval_cfg = make_cfg(f"ckpt_path={path}", config_name="eval")
    evaluate(eval_cfg)
    assert eval_cfg.loss.label_smoothing == 0.1


def test_checkpoints_load_with_weights_only(make_cfg, tmp_path):
    train(make_cfg("debug=fdr", "trainer.fast_dev_run=false", *QUICK))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["config"]["model"]["patch_size"] == 4


def test_patch_size_that_does_not_divide_the_image_is_refused_before_training(make_cfg):
    with pytest.raises(
        ConfigError,
        match=r"(?s)model.*patch_size=5.*image_size=32.*valid patch sizes: \[1, 2, 4, 8, 16, 32\]",
    ):
        train(make_cfg("model.patch_size=5"))


def test_missing_cifar_data_says_where_it_looked(make_cfg, tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "data")):
        train(make_cfg("data=cifar10", "data.download=false", "debug=fdr"))


def test_missing_checkpoint_is_refused(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate(make_cfg(f"ckpt_path={tmp_path / 'nope.ckpt'}", config_name="eval"))


def test_unique_dir_never_reuses_an_existing_folder(tmp_path):
    taken = tmp_path / "2026-01-01_00-00-00"
    taken.mkdir()
    first = unique_dir(str(taken))
    assert first == f"{taken}_2"
    Path(first).mkdir()
    assert unique_dir(str(taken)) == first, "the choice must be stable within one process"


def test_default_demo_reaches_95_percent_test_accuracy(make_cfg, tmp_path):
    """The README's promise for `python src/train.py` (its time is measured in the README, not here)."""
    train(make_cfg())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.95


def test_every_logger_writes_offline(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(make_cfg("logger=many", *QUICK))
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_run_folder_records_the_code_commit_and_package_versions(make_cfg, tmp_path):
    train(make_cfg("debug=fdr"))
    record = json.loads((tmp_path / "provenance.json").read_text())
    assert record["packages"]["torch"] == torch.__version__.split("+")[0]
    assert record["packages"]["lightning"] == lightning.__version__
    assert re.fullmatch(r"[0-9a-f]{40}", record["git_commit"]), "the suite runs from a git checkout"
    assert isinstance(record["git_dirty"], bool)


def test_compile_compiles_the_backbone_in_place_and_trains(make_cfg, tmp_path):
    cfg = make_cfg("debug=fdr", "compile={backend: aot_eager}")
    model = build_classifier(cfg)
    assert model.backbone._compiled_call_impl is not None
    assert not any("_orig_mod" in key for key in model.state_dict()), "checkpoints stay portable"
    train(cfg)
    assert "test/acc" in json.loads((tmp_path / "metrics.json").read_text())


def test_compile_is_off_by_default(make_cfg):
    assert build_classifier(make_cfg()).backbone._compiled_call_impl is None
