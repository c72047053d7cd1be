"""The EMA of the weights (`vitlab.training.ema`): its decay, its metrics, its checkpoint keys,
and `ema=true` in `src/eval.py` and the deployment loader."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader, TensorDataset

import vitlab.runs.tasks as tasks
from tests.conftest import compose_config, tiny_vit
from vitlab.deploy.source import load_source
from vitlab.errors import ConfigError
from vitlab.runs.validate import check_run
from vitlab.training.classifier import ImageClassifier
from vitlab.training.ema import EMA, EMA_STATE, EMA_STATE_DICT, ema_decay

DECAY = 0.9
# One epoch of 4 steps on the digits at 16x16, validated and tested on 2 batches each.
QUICK_EMA = (
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "data.batch_size=32",
    "data.image_size=16",
    "scheduler.warmup_steps=1",
    "optimizer.lr=0.01",
    "callbacks.progress_bar=null",
    "callbacks.throughput=null",
    f"callbacks.ema.decay={DECAY}",
)


class StepWeights(L.Callback):
    """The module's weights after each optimizer step."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        self.weights.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


class SaveAtStep(L.Callback):
    """`trainer.save_checkpoint(path)` after optimizer step `step`, as `GracefulStop` saves."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def _fit_tiny(tmp_path: Path, *callbacks: L.Callback, steps: int = 3) -> L.Trainer:
    """`steps` SGD steps of a tiny ViT on random images, no validation, nothing logged."""
    torch.manual_seed(0)
    model = ImageClassifier(tiny_vit(), num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.5))
    torch.nn.init.normal_(model.backbone.head.weight)  # a zero head passes no gradient back
    data = TensorDataset(torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,)))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    return trainer


@pytest.fixture(scope="module")
def tiny_ema(tmp_path_factory: pytest.TempPathFactory) -> tuple[StepWeights, EMA, Path]:
    """3 steps with `EMA(decay=0.9)`, the weights of each step, and a checkpoint saved after
    the last step by a callback whose hook runs before the EMA's."""
    folder = tmp_path_factory.mktemp("tiny_ema")
    steps, ema = StepWeights(), EMA(decay=DECAY)
    _fit_tiny(folder, steps, SaveAtStep(3, folder / "step3.ckpt"), ema, steps=3)
    return steps, ema, folder / "step3.ckpt"


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a short digits run with `callbacks.ema.decay=0.9`."""
    folder = tmp_path_factory.mktemp("ema_run")
    try:
        tasks.train(compose_config("train", list(QUICK_EMA), folder))
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    return folder


def _best(run: Path) -> Path:
    (best,) = (run / "checkpoints").glob("epoch_*.ckpt")
    return best


def _metrics(run: Path) -> dict[str, float]:
    return json.loads((run / "metrics.json").read_text())


# --- The decay ------------------------------------------------------------------------------


def test_the_decay_warms_up_from_a_copy_to_the_configured_decay():
    assert ema_decay(0.9999, 0) == 0.0, "the first update copies the weights"
    assert ema_decay(0.9999, 1) == pytest.approx(1 - 2**-0.75)
    assert ema_decay(0.9999, 9) == pytest.approx(1 - 10**-0.75)
    assert ema_decay(0.9999, 9, warmup_power=2 / 3) == pytest.approx(1 - 10 ** (-2 / 3))
    assert ema_decay(0.999, 10**4) == pytest.approx(0.999, abs=1e-6), "timm: 0.999 at ~10k"
    assert ema_decay(0.9999, 10**7) == 0.9999, "capped at the decay"


def test_without_warmup_every_update_after_the_first_uses_the_decay():
    assert ema_decay(0.9999, 0, warmup=False) == 0.0
    assert ema_decay(0.9999, 1, warmup=False) == 0.9999


# --- Off by default, and refused where it cannot work -----------------------------------------


def test_ema_is_off_by_default_builds_nothing_and_saves_no_ema_weights(make_cfg, tmp_path):
    assert make_cfg().callbacks.ema.decay is None
    ema = EMA()
    trainer = _fit_tiny(tmp_path, ema, steps=1)
    assert ema._average_model is None
    trainer.save_checkpoint(tmp_path / "off.ckpt")
    checkpoint = torch.load(tmp_path / "off.ckpt", weights_only=True)
    assert EMA_STATE_DICT not in checkpoint and EMA_STATE not in checkpoint


def test_a_decay_outside_0_1_is_refused_naming_the_key(make_cfg):
    with pytest.raises(ConfigError, match=r"callbacks\.ema\.decay=1\.0"):
        check_run(make_cfg("callbacks.ema.decay=1.0"))


def test_ema_under_fsdp_is_refused_naming_the_strategy():
    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ConfigError, match=r"callbacks.ema.decay=0.9 .* FSDPStrategy shards"):
        EMA(decay=DECAY).setup(trainer, ImageClassifier(tiny_vit(), num_classes=10), "fit")


# --- The average ------------------------------------------------------------------------------


def test_the_ema_is_the_average_of_the_weights_after_each_step_by_hand(tiny_ema):
    steps, ema, _ = tiny_ema
    expected = steps.weights[0]
    for n, weights in enumerate(steps.weights[1:], start=1):
        decay = ema_decay(DECAY, n)
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in weights}
    averaged = ema._average_model.module.state_dict()
    assert averaged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(averaged[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(
        averaged["backbone.head.weight"], steps.weights[-1]["backbone.head.weight"]
    )


def test_a_checkpoint_saved_before_the_emas_hook_holds_that_steps_update(tiny_ema):
    _, ema, path = tiny_ema
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint[EMA_STATE] == {"n_averaged": 3, "latest_update_step": 3}
    for name, tensor in ema._average_model.module.state_dict().items():
        assert torch.equal(checkpoint[EMA_STATE_DICT][name], tensor), name


def test_a_run_with_ema_logs_its_val_and_test_metrics_beside_the_weights(ema_run):
    metrics = _metrics(ema_run)
    for split in ("val", "test"):
        assert {f"{split}/acc", f"{split}/acc_ema", f"{split}/loss_ema"} <= set(metrics), split
        assert 0.0 <= metrics[f"{split}/acc_ema"] <= 1.0


def test_its_checkpoints_hold_the_trained_and_the_ema_weights_under_the_same_keys(ema_run):
    checkpoint = torch.load(_best(ema_run), weights_only=True)
    trained, averaged = checkpoint["state_dict"], checkpoint[EMA_STATE_DICT]
    assert averaged.keys() == trained.keys()
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained)
    assert checkpoint[EMA_STATE] == {"n_averaged": 4, "latest_update_step": 4}


# --- Reading the EMA weights --------------------------------------------------------------------


@pytest.mark.parametrize(("ema", "suffix"), [("true", "_ema"), ("false", "")])
def test_eval_reproduces_the_runs_test_metrics_of_the_weights_it_picks(
    ema_run, make_cfg, ema, suffix
):
    cfg = make_cfg(
        f"ckpt_path={_best(ema_run)}",
        f"ema={ema}",
        "trainer.limit_test_batches=2",
        "callbacks=none",
        config_name="eval",
    )
    tested = tasks.evaluate(cfg)
    trained = _metrics(ema_run)
    assert tested["test/acc"] == pytest.approx(trained[f"test/acc{suffix}"], abs=1e-6)
    assert tested["test/loss"] == pytest.approx(trained[f"test/loss{suffix}"], abs=1e-6)


def test_eval_with_ema_of_a_checkpoint_without_ema_weights_is_refused(ema_run, make_cfg, tmp_path):
    checkpoint = torch.load(_best(ema_run), weights_only=True)
    del checkpoint[EMA_STATE_DICT]
    path = tmp_path / "no_ema.ckpt"
    torch.save(checkpoint, path)
    cfg = make_cfg(f"ckpt_path={path}", "ema=true", config_name="eval")
    with pytest.raises(
        ConfigError, match=rf"ckpt_path={path} holds no EMA weights.*callbacks\.ema\.decay"
    ):
        tasks.evaluate(cfg)


def test_load_source_with_ema_gives_the_backbone_the_ema_weights(ema_run):
    averaged = torch.load(_best(ema_run), weights_only=True)[EMA_STATE_DICT]
    model = load_source(_best(ema_run), key="ckpt_path", ema=True).model
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, averaged[f"backbone.{name}"]), name
