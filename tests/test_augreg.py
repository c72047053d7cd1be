"""AugReg-style training: stochastic depth, RandAugment, Mixup / CutMix with soft labels, the recipes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchvision.transforms import v2

from tests.conftest import tiny_vit
from vitlab.data import DigitsDataModule
from vitlab.data.transforms import MixupCutmix, train_transform
from vitlab.models.layers import DropPath
from vitlab.runs.tasks import train
from vitlab.training.classifier import ImageClassifier


def test_drop_path_is_the_identity_in_eval_mode_and_at_rate_zero():
    x = torch.randn(8, 5, 4)
    assert torch.equal(DropPath(0.5).eval()(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    torch.manual_seed(0)
    out = DropPath(0.25).train()(torch.ones(20_000, 3, 2))
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    assert (per_sample[:, 0] == 0).float().mean() == pytest.approx(0.25, abs=0.01)
    assert out.mean() == pytest.approx(1.0, abs=0.02)


def test_drop_path_rises_linearly_over_the_blocks_and_leaves_the_state_dict_alone():
    model = tiny_vit(num_layers=5, drop_path_rate=0.2)
    assert [block.drop_path.rate for block in model.blocks] == pytest.approx(
        [0, 0.05, 0.1, 0.15, 0.2]
    )
    assert model.state_dict().keys() == tiny_vit(num_layers=5).state_dict().keys()


def test_drop_path_is_off_by_default_and_in_the_paper_configs(make_cfg):
    assert all(block.drop_path.rate == 0.0 for block in tiny_vit().blocks)
    assert make_cfg("model=vit_b16").model.drop_path_rate == 0.0


def test_randaugment_joins_the_train_transform_only_when_asked():
    def kinds(transform: v2.Compose) -> list[type]:
        return [type(t) for t in transform.transforms]

    assert v2.RandAugment not in kinds(train_transform(32, 3, (0.5, 1), (0.75, 1.33), True))
    with_it = train_transform(32, 3, (0.5, 1), (0.75, 1.33), True, randaugment=(2, 10))
    [rand] = [t for t in with_it.transforms if isinstance(t, v2.RandAugment)]
    assert (rand.num_ops, rand.magnitude) == (2, 10)


def test_mixup_cutmix_gives_soft_labels_that_sum_to_one():
    images, labels = torch.randn(6, 3, 8, 8), torch.arange(6)
    mixed, soft = MixupCutmix(10, mixup_alpha=0.2, cutmix_alpha=1.0)((images, labels))
    assert mixed.shape == images.shape
    assert soft.shape == (6, 10)
    assert torch.allclose(soft.sum(dim=1), torch.ones(6))
    assert not torch.equal(mixed, images)


def _first_train_batch(**mix: float) -> tuple[torch.Tensor, torch.Tensor]:
    data = DigitsDataModule(batch_size=16, **mix)
    data.setup()
    return next(iter(data.train_dataloader()))


def test_digits_loader_mixes_batches_reproducibly_under_the_per_batch_seed():
    torch.manual_seed(1)
    images, soft = _first_train_batch(mixup_alpha=0.2, cutmix_alpha=1.0)
    torch.manual_seed(2)  # the global RNG does not decide the mix: the sample seed does
    again, soft_again = _first_train_batch(mixup_alpha=0.2, cutmix_alpha=1.0)
    assert soft.shape == (16, 10)
    assert (soft.max(dim=1).values < 1).any(), "some labels are mixtures"
    assert torch.equal(images, again) and torch.equal(soft, soft_again)


def test_loader_gives_integer_labels_when_mixing_is_off():
    _, labels = _first_train_batch()
    assert labels.dtype == torch.int64 and labels.shape == (16,)


def test_negative_mixup_alpha_is_refused_naming_the_key():
    with pytest.raises(Exception, match=r"data.mixup_alpha=-1"):
        DigitsDataModule(mixup_alpha=-1)


def test_classifier_trains_on_soft_labels_and_counts_accuracy_by_their_largest_part():
    model = ImageClassifier(tiny_vit(), num_classes=10)
    images = torch.randn(4, 3, 16, 16)
    soft = F.one_hot(torch.tensor([1, 2, 3, 4]), 10).float() * 0.7 + 0.03
    logits = model(images)
    loss = model._loss_and_log_metrics((images, soft), "train")
    assert loss.item() == pytest.approx(F.cross_entropy(logits, soft).item(), rel=1e-5)
    expected = (logits.argmax(-1) == torch.tensor([1, 2, 3, 4])).float().mean()
    assert model.train_metrics["acc"].compute() == pytest.approx(expected.item())


def test_augreg_imagenet_is_the_from_scratch_recipe(make_cfg):
    cfg = OmegaConf.to_container(make_cfg("experiment=augreg_imagenet"), resolve=True)
    assert cfg["model"]["pretrained"] is None
    assert (cfg["model"]["dropout_rate"], cfg["model"]["drop_path_rate"]) == (0.1, 0.1)
    assert cfg["optimizer"]["_target_"] == "torch.optim.AdamW"
    assert (cfg["optimizer"]["lr"], cfg["optimizer"]["weight_decay"]) == (1e-3, 0.1)
    assert cfg["data"]["randaugment"] == [2, 15]
    assert cfg["data"]["mixup_alpha"] > 0 and cfg["data"]["cutmix_alpha"] > 0
    assert (cfg["data"]["batch_size"], cfg["data"]["num_classes"]) == (4096, 1000)
    assert cfg["trainer"]["gradient_clip_val"] == 1.0


def test_augreg_digits_trains_on_the_cpu_with_mixed_labels(make_cfg, tmp_path):
    cfg = make_cfg(
        "experiment=augreg_digits",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "scheduler.warmup_steps=1",
    )
    assert cfg.data.mixup_alpha > 0 and cfg.model.drop_path_rate > 0
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"train/loss", "train/acc", "val/acc", "test/acc"} <= set(metrics)
