"""Resuming: exact continuation, `ckpt_path=last` / `resume=auto`, the run folder, W&B id, atomic saves."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import vitlab.runs.tasks as tasks
from tests.conftest import run_train_py
from vitlab.errors import ConfigError, Interrupted
from vitlab.runs.build import build_trainer
from vitlab.runs.resume import newest_checkpoint, resolve_ckpt_path
from vitlab.training.checkpoint_io import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]

# 40 steps of 64 digits: two epochs of 20 steps, validated at steps 20 and 40; with
# dropout (or stochastic depth), so the global RNG matters too.
EXACT = (
    "trainer=cpu",
    "trainer.deterministic=true",
    "trainer.max_steps=40",
    "trainer.log_every_n_steps=1",
    "data.batch_size=64",
    "scheduler.warmup_steps=5",
    "callbacks.progress_bar=null",
    "test=false",
)


class SignalAtStep(L.Callback):
    """SIGTERM to this process after training step `step` (GracefulStop turns it into a checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            signal.raise_signal(signal.SIGTERM)


def _train_with(cfg: Any, *extra: L.Callback, monkeypatch: pytest.MonkeyPatch) -> Any:
    build = tasks.build_trainer

    def build_with_extra(cfg: Any, **kwargs: Any) -> L.Trainer:
        trainer = build(cfg, **kwargs)
        trainer.callbacks.extend(extra)
        return trainer

    with monkeypatch.context() as patch:
        patch.setattr(tasks, "build_trainer", build_with_extra)
        return tasks.train(cfg)


# Each model draws random numbers in every step: dropout, stochastic depth, and for the ViT
# also FlexiViT's patch size (from seed and step) and PatchDropout's tokens (global RNG).
# The ViT also keeps an EMA of its weights, which must resume exactly too.
RANDOM_MODELS = {
    "vit": (
        "model=vit_tiny",
        "model.dropout_rate=0.1",
        "model.flexi_patch_sizes=[4,8]",
        "model.patch_dropout=0.25",
        "callbacks.ema.decay=0.9",
    ),
    "gmlp": ("model=gmlp_tiny", "model.drop_path_rate=0.1"),
}


@pytest.mark.parametrize("model", RANDOM_MODELS.values(), ids=RANDOM_MODELS.keys())
def test_a_run_stopped_mid_epoch_and_resumed_ends_exactly_like_an_uninterrupted_one(
    make_cfg, tmp_path, monkeypatch, model
):
    exact = (*EXACT, *model)
    tasks.train(make_cfg(*exact))
    whole_dir = tmp_path / "whole"
    whole_dir.mkdir()
    for name in ("checkpoints", "csv", "metrics.json"):
        (tmp_path / name).rename(whole_dir / name)

    # GracefulStop sees the signal at the end of the next step: 28.
    with pytest.raises(Interrupted, match="at step 28"):
        _train_with(make_cfg(*exact), SignalAtStep(27), monkeypatch=monkeypatch)
    stopped = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] == 28 and stopped["epoch"] == 1, "mid-epoch"
    tasks.train(make_cfg(*exact, "ckpt_path=last"))

    whole = torch.load(whole_dir / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    for name, tensor in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)
    with_ema = "callbacks.ema.decay=0.9" in model
    assert ("ema_state_dict" in whole) == ("ema_state_dict" in resumed) == with_ema
    for name, tensor in whole.get("ema_state_dict", {}).items():
        assert torch.equal(resumed["ema_state_dict"][name], tensor), f"EMA {name}"
    assert resumed.get("ema_state") == whole.get("ema_state")
    expected = json.loads((whole_dir / "metrics.json").read_text())
    got = json.loads((tmp_path / "metrics.json").read_text())
    keys = ("val/loss", "val/acc", "train/loss_step", "lr-AdamW/pg1")
    for key in (*keys, "val/acc_ema", "val/loss_ema") if with_ema else keys:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key


def test_ckpt_path_last_takes_the_newest_checkpoint_of_the_run_folder(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for name in ("checkpoints/epoch_001.ckpt", "checkpoints/last.ckpt", "hpc_ckpt_1.ckpt"):
        (tmp_path / name).write_bytes(b"x")
        time.sleep(0.01)
    assert newest_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    assert resolve_ckpt_path("last", None, str(tmp_path)) == str(tmp_path / "hpc_ckpt_1.ckpt")


def test_ckpt_path_last_without_a_checkpoint_names_the_folder(tmp_path):
    with pytest.raises(ConfigError, match=rf"ckpt_path=last.*{tmp_path}.*run_dir="):
        resolve_ckpt_path("last", None, str(tmp_path))


def test_resume_auto_starts_fresh_in_an_empty_folder_and_continues_a_used_one(tmp_path):
    assert resolve_ckpt_path(None, "auto", str(tmp_path)) is None
    assert resolve_ckpt_path("init.ckpt", "auto", str(tmp_path)) == "init.ckpt"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    last = str(tmp_path / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(None, "auto", str(tmp_path)) == last
    assert resolve_ckpt_path("init.ckpt", "auto", str(tmp_path)) == last, "a requeued fine-tune"
    assert resolve_ckpt_path(None, None, str(tmp_path)) is None, "no resume unless asked"


def test_resume_takes_only_auto(tmp_path):
    with pytest.raises(ConfigError, match=r"resume='yes'.*resume=auto"):
        resolve_ckpt_path(None, "yes", str(tmp_path))


def test_a_foreign_file_as_ckpt_path_is_refused_naming_it_and_its_keys(make_cfg, tmp_path):
    foreign = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(
        ConfigError, match=rf"{foreign} is not a Lightning training checkpoint.*'model'"
    ):
        tasks.train(make_cfg(f"ckpt_path={foreign}"))


def test_detect_anomaly_reaches_the_trainer(make_cfg):
    assert build_trainer(make_cfg("trainer.detect_anomaly=true"))._detect_anomaly
    assert not build_trainer(make_cfg())._detect_anomaly


def test_the_trainer_saves_checkpoints_atomically(make_cfg):
    assert isinstance(build_trainer(make_cfg()).strategy.checkpoint_io, AtomicCheckpointIO)


_SAVE_FOREVER = """
import sys, torch
from vitlab.training.checkpoint_io import AtomicCheckpointIO
io, big = AtomicCheckpointIO(), {"state_dict": {"w": torch.randn(4_000_000)}}
print("saving", flush=True)
while True:
    big["state_dict"]["w"] += 1
    io.save_checkpoint(big, sys.argv[1])
"""


def test_a_kill_during_a_save_leaves_the_old_or_the_new_checkpoint_whole(tmp_path):
    target = tmp_path / "last.ckpt"
    for delay_s in (0.3, 0.45, 0.6, 0.75):
        saver = subprocess.Popen(
            [sys.executable, "-c", _SAVE_FOREVER, str(target)], stdout=subprocess.PIPE, text=True
        )
        assert saver.stdout is not None and saver.stdout.readline() == "saving\n"
        time.sleep(delay_s)
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        if target.exists():
            assert zipfile.is_zipfile(target)
            assert torch.load(target, weights_only=True)["state_dict"]["w"].numel() == 4_000_000
    assert target.exists(), "at least one save finished in 0.75 s"


def _train_py(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_train_py("extras.print_config=false", *args, cwd=cwd)


def test_a_run_folder_is_only_reused_by_a_run_that_resumes_it(tmp_path):
    run = tmp_path / "run"
    quick = (
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "scheduler.warmup_steps=1",
        "test=false",
        "callbacks.progress_bar=null",
        "logger=many",
        f"run_dir={run}",
    )
    first = _train_py(*quick, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    config = (run / ".hydra" / "config.yaml").read_text()

    again = _train_py(*quick, "optimizer.lr=0.1", cwd=tmp_path)
    assert again.returncode == 2
    assert f"the run folder {run} already holds a run" in again.stderr
    assert "resume=auto" in again.stderr and "Traceback" not in again.stderr
    assert (run / ".hydra" / "config.yaml").read_text() == config, "the old run is untouched"

    resumed = _train_py(*quick, "trainer.max_epochs=2", "resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / ".hydra" / "config.yaml").read_text() == config
    assert "resume=auto" in (run / ".hydra" / "resume_2" / "overrides.yaml").read_text()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    rows = (run / "csv" / "metrics.csv").read_text().splitlines()
    steps = {int(float(row.split(",")[rows[0].split(",").index("step")])) for row in rows[1:]}
    assert {2, 5} <= steps, "the first run's rows are kept, the resumed run's appended"
    wandb_id = (run / "wandb_id").read_text().strip()
    offline_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(wandb_id) for p in offline_runs)
