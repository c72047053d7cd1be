"""`src/eval.py` reports the speed of the model it tests (`conf/callbacks/eval.yaml`); training
logs what it always logged."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from tests.conftest import compose_config
from vitlab.reports.runs import load_run
from vitlab.runs.tasks import evaluate, train

QUICK = (
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=3",
    "scheduler.warmup_steps=1",
    "callbacks.progress_bar=null",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny default run, tested after fit: its folder."""
    run = tmp_path_factory.mktemp("train")
    train(compose_config("train", list(QUICK), run))
    yield run
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


def test_training_logs_no_test_throughput(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert "test/acc" in metrics and metrics["train/samples_per_sec"] > 0
    assert not {"test/samples_per_sec", "test/mfu"} & set(metrics)


def test_eval_writes_the_test_throughput_into_metrics_json(trained, make_cfg, tmp_path):
    last = trained / "checkpoints" / "last.ckpt"
    evaluate(make_cfg(f"ckpt_path={last}", "trainer.limit_test_batches=3", config_name="eval"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test/samples_per_sec"] > 0
    assert math.isfinite(metrics["test/mfu"]) and metrics["test/mfu"] > 0
    assert "train/samples_per_sec" not in metrics


def test_an_eval_run_records_the_model_it_took_from_the_checkpoint(trained, make_cfg, tmp_path):
    last = trained / "checkpoints" / "last.ckpt"
    evaluate(make_cfg(f"ckpt_path={last}", "trainer.limit_test_batches=1", config_name="eval"))
    run = load_run(tmp_path)
    assert run.value("model.patch_size") == 4 and run.value("model.pos_embed") == "learned"
    assert run.value("data.image_size") == 32
