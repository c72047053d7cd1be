"""SIGTERM / SIGINT during training: stop at a step boundary, save last.ckpt, resume from it."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from vitlab.errors import Interrupted
from vitlab.training.signals import GracefulStop

ROOT = Path(__file__).resolve().parents[1]
GRACEFUL_STOP = "++callbacks.graceful_stop={_target_: vitlab.training.signals.GracefulStop, dirpath: ${paths.output_dir}/checkpoints}"


class SendSignalAt(L.Callback):
    """Send `signum` to this process at the end of training batch `batch_idx`."""

    def __init__(self, signum: int, batch_idx: int) -> None:
        self.signum, self.batch_idx = signum, batch_idx

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.batch_idx + 1:
            signal.raise_signal(self.signum)


def bare_trainer(tmp_path: Path, *callbacks: L.Callback, **kwargs: Any) -> L.Trainer:
    """A Trainer with only these callbacks: no logger, checkpointing, progress bar or validation."""
    return L.Trainer(
        default_root_dir=tmp_path,
        limit_val_batches=0,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_last_ckpt_at_the_step_boundary_and_raises(tmp_path, signum, exit_code):
    handler_before = signal.getsignal(signum)
    stop = GracefulStop(dirpath=str(tmp_path / "checkpoints"))
    trainer = bare_trainer(
        tmp_path, SendSignalAt(signum, batch_idx=2), stop, max_epochs=1, limit_train_batches=20
    )
    with pytest.raises(Interrupted, match=r"at step 3; checkpoint: .*last\.ckpt") as err:
        trainer.fit(BoringModel())

    assert err.value.exit_code == exit_code
    assert trainer.global_step == 3
    assert stop.interrupted_by == signal.Signals(signum).name
    assert stop.checkpoint == tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(stop.checkpoint, weights_only=True)["global_step"] == 3
    assert signal.getsignal(signum) is handler_before


def test_a_fit_without_a_signal_is_not_interrupted(tmp_path):
    stop = GracefulStop(dirpath=str(tmp_path / "checkpoints"))
    trainer = bare_trainer(tmp_path, stop, max_steps=3)
    trainer.fit(BoringModel())

    assert trainer.global_step == 3
    assert stop.interrupted_by is None and not (tmp_path / "checkpoints").exists()


def _train_py(*args: str, cwd: Path, stdout: Any) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "src" / "train.py"), "extras.print_config=false", *args],
        cwd=cwd,
        env=env,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(pattern: str, timeout_s: float, proc: subprocess.Popen) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        found = sorted(Path().glob(pattern))
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no {pattern} within {timeout_s} s (exit status {proc.poll()})")


def test_sigterm_stops_train_py_with_a_checkpoint_that_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_args = ("trainer.max_epochs=50", "scheduler.warmup_steps=10", GRACEFUL_STOP)
    with open(tmp_path / "first.txt", "w") as out:
        first = _train_py(*run_args, cwd=tmp_path, stdout=out)
        _wait_for("logs/train/runs/*/checkpoints/epoch_000.ckpt", timeout_s=120, proc=first)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 128 + signal.SIGTERM
    output = (tmp_path / "first.txt").read_text()
    stopped = re.search(
        r"Stopped by SIGTERM at step (\d+); checkpoint: (\S+)\. Resume with: ", output
    )
    assert stopped, output[-3000:]
    step, last = int(stopped.group(1)), Path(stopped.group(2))
    assert last.name == "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == step > 0

    with open(tmp_path / "resumed.txt", "w") as out:
        resumed = _train_py(
            *run_args,
            f"ckpt_path={last}",
            f"trainer.max_steps={step + 30}",
            cwd=tmp_path,
            stdout=out,
        )
        assert resumed.wait(timeout=120) == 0, (tmp_path / "resumed.txt").read_text()[-3000:]
    runs = sorted((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 2 and (runs[1] / "metrics.json").is_file()
    with open(runs[1] / "csv" / "metrics.csv") as f:
        logged_steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert min(logged_steps) >= step and max(logged_steps) >= step + 29
