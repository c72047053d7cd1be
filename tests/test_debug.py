"""The debug presets (`conf/debug/`), each on the default config, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import RichProgressBar

from vitlab.runs.build import build_trainer
from vitlab.runs.tasks import train


def _metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "metrics.json").read_text())


def test_debug_default_is_one_epoch_on_the_cpu_without_loggers_or_callbacks_but_the_bar(make_cfg):
    cfg = make_cfg("debug=default")
    assert list(cfg.callbacks) == ["progress_bar"]
    assert cfg.get("logger") is None
    assert cfg.data.num_workers == 0
    trainer = build_trainer(cfg)
    assert trainer.max_epochs == 1 and trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    assert trainer.loggers == []
    assert any(isinstance(c, RichProgressBar) for c in trainer.callbacks)
    assert cfg.trainer.detect_anomaly is True


def test_debug_default_trains_and_tests(make_cfg, tmp_path):
    train(make_cfg("debug=default"))
    assert {"train/loss", "val/acc", "test/acc"} <= set(_metrics(tmp_path))


def test_debug_limit_runs_three_short_epochs(make_cfg, tmp_path):
    cfg = make_cfg("debug=limit")
    train(cfg)
    # 3 epochs of 3 training batches: the last checkpoint is at step 9.
    ckpts = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts and any("step=9" in p.name for p in ckpts), ckpts


def test_debug_overfit_learns_three_batches_by_heart(make_cfg, tmp_path):
    train(make_cfg("debug=overfit"))
    assert _metrics(tmp_path)["train/acc"] >= 0.99


def test_debug_profiler_writes_the_profile_into_the_run_folder(make_cfg, tmp_path):
    train(make_cfg("debug=profiler"))
    report = tmp_path / "fit-profile.txt"
    assert report.is_file() and "run_training_epoch" in report.read_text()


@pytest.mark.parametrize("preset", ["default", "limit", "overfit", "profiler"])
def test_each_preset_composes_with_a_shorter_run(make_cfg, preset):
    """A newcomer's first edits on top of a preset still compose and validate."""
    from vitlab.runs.validate import check_run

    check_run(make_cfg(f"debug={preset}", "trainer.max_epochs=1", "data.batch_size=32"))
