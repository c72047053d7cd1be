"""An error during training saves last.ckpt at the last completed step; resuming from it is exact."""

from __future__ import annotations

import csv
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.demos.boring_classes import BoringModel
from torchvision.datasets import ImageFolder

import vitlab.runs.tasks as tasks
from tests.conftest import compose_config
from tests.test_data import write_image_folder
from tests.test_signals import bare_trainer
from vitlab.data.samplers import EpochShuffleSampler
from vitlab.errors import DataError, NonFiniteLossError
from vitlab.training.crash import CrashCheckpoint

# 16 training images in batches of 4: two epochs of 4 steps, with dropout (the global RNG matters).
TINY = (
    "trainer=cpu",
    "trainer.deterministic=true",
    "trainer.max_steps=8",
    "trainer.log_every_n_steps=1",
    "data=image_folder",
    "data.num_classes=2",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.pin_memory=false",
    "data.image_size=16",
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.mlp_dim=64",
    "model.patch_size=4",
    "model.dropout_rate=0.1",
    "scheduler.warmup_steps=0",
    "callbacks.progress_bar=null",
    "test=false",
)
BATCH_SIZE, SEED = 4, 42  # data.batch_size above, and train.yaml's seed (the data order's)


class At(L.Callback):
    """Run `action(trainer)` in the hook `hook` once the trainer has completed `step` optimizer steps."""

    def __init__(self, hook: str, step: int, action: Callable[[L.Trainer], None]) -> None:
        self.step, self.action = step, action
        setattr(self, hook, self._run)

    def _run(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.action(trainer)


def _boom(trainer: L.Trainer) -> None:
    raise RuntimeError(f"boom at step {trainer.global_step}")


def _train(run: Path, images: Path, *overrides: str, extra: tuple[L.Callback, ...] = ()) -> None:
    """`src/train.py TINY overrides` on `images`, writing into `run`, with test-only callbacks last."""
    cfg = compose_config("train", [*TINY, f"data.data_dir={images}", *overrides], run)
    build = tasks.build_trainer

    def build_with_extra(cfg: Any, **kwargs: Any) -> L.Trainer:
        trainer = build(cfg, **kwargs)
        trainer.callbacks.extend(extra)
        return trainer

    tasks.build_trainer = build_with_extra
    try:
        tasks.train(cfg)
    finally:
        tasks.build_trainer = build
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()


def _checkpoint(run: Path) -> dict[str, Any]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


@dataclass
class Outcome:
    """What a finished run leaves: its final weights and the training loss logged at each step."""

    weights: dict[str, torch.Tensor]
    losses: dict[int, str]

    @classmethod
    def of(cls, run: Path) -> Outcome:
        with open(run / "csv" / "metrics.csv") as f:
            rows = [row for row in csv.DictReader(f) if row["train/loss_step"]]
        losses = {int(row["step"]): row["train/loss_step"] for row in rows}
        return cls(_checkpoint(run)["state_dict"], losses)


def _assert_ended_like(run: Path, expected: Outcome) -> None:
    """Bit-identical weights, and the same steps logged with the same losses."""
    got = Outcome.of(run)
    assert got.weights.keys() == expected.weights.keys()
    for name, tensor in expected.weights.items():
        assert torch.equal(got.weights[name], tensor), name
    assert got.losses == expected.losses


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root, {"train": ["cat", "dog"], "val": ["cat", "dog"]}, per_class=8)
    return root


@pytest.fixture(scope="module")
def left_alone(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    """The run that nothing stops."""
    run = tmp_path_factory.mktemp("left_alone")
    _train(run, images)
    return Outcome.of(run)


def _image_at(images: Path, epoch: int, position: int) -> Path:
    """The training image that vitlab's sampler puts at `position` of epoch `epoch`."""
    samples = ImageFolder(str(images / "train")).samples
    sampler = EpochShuffleSampler(len(samples), seed=SEED)
    sampler.set_epoch(epoch)
    index, _ = list(sampler)[position]
    return Path(samples[index][0])


def test_a_corrupt_image_mid_epoch_leaves_last_ckpt_and_the_fixed_run_resumes_exactly(
    images, left_alone, tmp_path
):
    own_images, run = tmp_path / "images", tmp_path / "run"
    shutil.copytree(images, own_images)
    corrupt = _image_at(own_images, epoch=0, position=2 * BATCH_SIZE)  # in the 3rd batch
    good = corrupt.read_bytes()
    corrupt.write_bytes(b"not a png")

    with pytest.raises(DataError, match=re.escape(str(corrupt))) as err:
        _train(run, own_images)
    assert _checkpoint(run)["global_step"] == 2, "the two steps before the failing batch"
    (note,) = err.value.__notes__
    assert note.startswith(f"Saved {run}/checkpoints/last.ckpt at step 2 (epoch 0); resume with: ")
    assert note.endswith(f"run_dir={run} ckpt_path=last")

    corrupt.write_bytes(good)
    _train(run, own_images, "ckpt_path=last")
    _assert_ended_like(run, left_alone)


def test_an_error_in_the_forward_pass_resumes_from_the_step_before_exactly(
    images, left_alone, tmp_path
):
    # In step 5, the first of epoch 1: the loops have counted the new epoch and its first
    # batch, and the forward pass has drawn dropout's random numbers, when the error comes.
    with pytest.raises(RuntimeError, match="boom"):
        _train(tmp_path, images, extra=(At("on_before_backward", 4, _boom),))
    assert _checkpoint(tmp_path)["global_step"] == 4

    _train(tmp_path, images, "ckpt_path=last")
    _assert_ended_like(tmp_path, left_alone)


def test_a_nan_loss_keeps_the_checkpoints_before_it_and_writes_none(images, tmp_path):
    def poison(trainer: L.Trainer) -> None:  # the next step's loss is NaN
        for parameter in trainer.lightning_module.parameters():
            parameter.data.fill_(float("nan"))

    every_2_steps = (
        "callbacks.last_checkpoint.every_n_epochs=null",
        "+callbacks.last_checkpoint.every_n_train_steps=2",
    )
    with pytest.raises(NonFiniteLossError) as err:
        _train(tmp_path, images, *every_2_steps, extra=(At("on_train_batch_end", 3, poison),))
    assert "at step 3" in str(err.value)
    assert _checkpoint(tmp_path)["global_step"] == 2, "the last one before the NaN, not step 3"
    assert not getattr(err.value, "__notes__", [])


def test_an_error_in_a_callback_saves_the_step_whose_end_it_interrupted(tmp_path):
    # on_train_batch_end of step 3 runs after step 3's update: step 3 is the last completed.
    crash = CrashCheckpoint(str(tmp_path / "checkpoints"), overrides=["trainer.max_steps=9"])
    trainer = bare_trainer(tmp_path, crash, At("on_train_batch_end", 3, _boom), max_steps=9)
    with pytest.raises(RuntimeError, match="boom at step 3") as err:
        trainer.fit(BoringModel())

    assert crash.checkpoint == tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(crash.checkpoint, weights_only=True)["global_step"] == 3
    assert err.value.__notes__ == [
        f"Saved {crash.checkpoint} at step 3 (epoch 0); resume with: "
        f"python src/train.py trainer.max_steps=9 run_dir={tmp_path} ckpt_path=last"
    ]


def _boom_on_two_processes(trainer: L.Trainer) -> None:
    trainer.strategy.world_size = 2  # what DDP's strategy reports
    _boom(trainer)


@pytest.mark.parametrize(
    ("hook", "action", "why"),
    [
        (
            "on_before_optimizer_step",
            _boom,
            "the failure came after step 4 had begun updating the weights",
        ),
        (
            "on_train_batch_start",
            _boom_on_two_processes,
            "with 2 processes a save needs all of them",
        ),
    ],
)
def test_an_error_it_cannot_save_after_leaves_last_ckpt_alone_and_says_why(
    tmp_path, hook, action, why
):
    crash = CrashCheckpoint(str(tmp_path / "checkpoints"))
    trainer = bare_trainer(tmp_path, crash, At(hook, 3, action), max_steps=9)
    with pytest.raises(RuntimeError, match="boom") as err:
        trainer.fit(BoringModel())

    assert crash.checkpoint is None and not (tmp_path / "checkpoints").exists()
    assert f"Saved no checkpoint: {why}" in err.value.__notes__[0]
    assert "resume with: python src/train.py" in err.value.__notes__[0]


def test_an_error_before_the_first_step_saves_nothing(tmp_path):
    crash = CrashCheckpoint(str(tmp_path / "checkpoints"))
    trainer = bare_trainer(tmp_path, crash, At("on_before_backward", 0, _boom), max_steps=9)
    with pytest.raises(RuntimeError, match="boom") as err:
        trainer.fit(BoringModel())

    assert not (tmp_path / "checkpoints").exists()
    assert not getattr(err.value, "__notes__", [])
