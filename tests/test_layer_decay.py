"""Layer-wise learning-rate decay (`optimizer.layer_decay`): the rate each group really has.

Every rate is read from `optimizer.param_groups[i]["lr"]` after the scheduler has set it,
so a scale that torch's schedulers would ignore (timm's `lr_scale`) fails these tests.
"""

from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace
from unittest.mock import PropertyMock, patch

import pytest
import torch
from torch import nn

from tests.conftest import tiny_vit
from vitlab.errors import ConfigError
from vitlab.models.gmlp import GMlp
from vitlab.models.mixer import MlpMixer
from vitlab.runs.build import build_classifier
from vitlab.runs.validate import check_run
from vitlab.training.classifier import ImageClassifier
from vitlab.training.optim import build_optimizer, param_groups, warmup_cosine

LR, WEIGHT_DECAY, DECAY = 0.1, 0.05, 0.75
ADAMW = partial(torch.optim.AdamW, lr=LR, weight_decay=WEIGHT_DECAY)


def tiny_mixer() -> MlpMixer:
    return MlpMixer(
        image_size=16,
        patch_size=4,
        num_classes=10,
        hidden_dim=16,
        num_blocks=2,
        tokens_mlp_dim=8,
        channels_mlp_dim=32,
    )


def tiny_gmlp() -> GMlp:
    return GMlp(
        image_size=16, patch_size=4, num_classes=10, hidden_dim=16, num_blocks=2, ffn_dim=32
    )


def lr_of(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
    """Each parameter's learning rate, by name."""
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    return {name: group_of[id(p)]["lr"] for name, p in model.named_parameters()}


def expected_layer(name: str, depth: int) -> int:
    """BEiT's and MAE's numbering, written out by name for these models."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    before = ("cls_token", "pos_embed.", "patch_embed.", "stem.")
    return 0 if name.startswith(before) else depth + 1


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))


@pytest.mark.parametrize(
    "make_model",
    [
        tiny_vit,
        partial(tiny_vit, stem="resnet", resnet_layers=[1], patch_size=1),
        tiny_mixer,
        tiny_gmlp,
    ],
    ids=["vit", "hybrid", "mixer", "gmlp"],
)
def test_every_group_runs_warmup_cosine_scaled_by_decay_to_the_power_of_its_distance_from_the_head(
    make_model,
):
    model = make_model()
    depth = len(model.blocks)
    optimizer = build_optimizer(ADAMW, model, layer_decay=DECAY)
    schedule = warmup_cosine(optimizer, total_steps=12, warmup_steps=4)
    for step in range(12):
        if step in (0, 2, 4, 7, 11):  # warmup, its end, and the cosine decay
            factor = warmup_cosine_factor(step, warmup_steps=4, total_steps=12)
            expected = {
                name: LR * factor * DECAY ** (depth + 1 - expected_layer(name, depth))
                for name, _ in model.named_parameters()
            }
            assert lr_of(optimizer, model) == pytest.approx(expected), f"step {step}"
        optimizer.step()
        schedule.step()


def test_vit_head_gets_the_base_rate_and_patch_embedding_class_token_and_position_the_smallest():
    model = tiny_vit(num_layers=2)
    rates = lr_of(build_optimizer(ADAMW, model, layer_decay=DECAY), model)
    smallest = LR * DECAY**3
    assert rates["head.weight"] == rates["norm.weight"] == pytest.approx(LR)
    for name in ("patch_embed.proj.weight", "cls_token", "pos_embed.pos_embedding"):
        assert rates[name] == pytest.approx(smallest), name
    assert min(rates.values()) == pytest.approx(smallest)


def test_hybrid_resnet_stem_trains_at_the_patch_embeddings_rate():
    model = tiny_vit(stem="resnet", resnet_layers=[1], patch_size=1)
    rates = lr_of(build_optimizer(ADAMW, model, layer_decay=DECAY), model)
    stem = [rate for name, rate in rates.items() if name.startswith("stem.")]
    assert stem and set(stem) == {rates["patch_embed.proj.weight"]}
    assert rates["patch_embed.proj.weight"] == pytest.approx(LR * DECAY**3)


@pytest.mark.parametrize(
    "make_model",
    [
        tiny_vit,
        partial(tiny_vit, stem="resnet", resnet_layers=[1], patch_size=1),
        tiny_mixer,
        tiny_gmlp,
    ],
    ids=["vit", "hybrid", "mixer", "gmlp"],
)
def test_layer_decay_keeps_each_parameters_weight_decay(make_model):
    model = make_model()
    plain = param_groups(model, WEIGHT_DECAY)
    per_layer = param_groups(model, WEIGHT_DECAY, layer_decay=DECAY, lr=LR)

    def weight_decay_of(groups: list[dict]) -> dict[int, float]:
        return {id(p): group["weight_decay"] for group in groups for p in group["params"]}

    assert weight_decay_of(per_layer) == weight_decay_of(plain)
    named = dict(model.named_parameters())
    assert weight_decay_of(per_layer)[id(named["head.bias"])] == 0.0
    assert weight_decay_of(per_layer)[id(named["head.weight"])] == WEIGHT_DECAY


def test_groups_are_one_per_layer_and_weight_decay_named_and_none_is_empty():
    model = tiny_vit(num_layers=2)
    names = [group["name"] for group in param_groups(model, WEIGHT_DECAY, DECAY, lr=LR)]
    assert names == [
        "layer0_decay",
        "layer0_no_decay",
        "layer1_decay",
        "layer1_no_decay",
        "layer2_decay",
        "layer2_no_decay",
        "layer3_decay",
        "layer3_no_decay",
    ]
    assert all(group["params"] for group in param_groups(model, WEIGHT_DECAY, DECAY, lr=LR))


def test_null_layer_decay_gives_the_two_weight_decay_groups_at_one_rate():
    model = tiny_vit(num_layers=2)
    optimizer = build_optimizer(ADAMW, model, layer_decay=None)
    assert [sorted(set(group) - {"params"}) for group in optimizer.param_groups] == [
        sorted(optimizer.defaults)
    ] * 2
    assert [group["weight_decay"] for group in optimizer.param_groups] == [WEIGHT_DECAY, 0.0]
    assert {group["lr"] for group in optimizer.param_groups} == {LR}


def test_a_backbone_without_blocks_is_refused_when_the_classifier_is_built():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    with pytest.raises(ConfigError, match=r"optimizer.layer_decay is set.*Sequential.*no `blocks`"):
        ImageClassifier(backbone, num_classes=10, optimizer=ADAMW, layer_decay=DECAY)


@pytest.mark.parametrize(
    ("value", "shown"),
    [("0", "0"), ("1.5", "1.5"), ("abc", "'abc'"), ("true", "True"), ("[0.5]", r"\[0.5\]")],
)
def test_check_run_refuses_a_layer_decay_outside_zero_to_one(make_cfg, value, shown):
    """No signature types this key (vitlab's, not torch's), so its rule refuses every
    value that is not a number in range, a bool or a list too."""
    with pytest.raises(
        ConfigError,
        match=rf"optimizer.layer_decay={shown} is not valid: use a number in \(0, 1\]",
    ):
        check_run(make_cfg(f"optimizer.layer_decay={value}"))


def test_check_run_accepts_a_layer_decay_on_sgd(make_cfg):
    check_run(make_cfg("optimizer=sgd", "optimizer.layer_decay=1"))


def test_the_config_reaches_the_optimizer_and_its_schedule(make_cfg):
    cfg = make_cfg("optimizer.layer_decay=0.75", "scheduler.warmup_steps=4")
    model = build_classifier(cfg)
    trainer = SimpleNamespace(estimated_stepping_batches=20)
    with patch.object(ImageClassifier, "trainer", new_callable=PropertyMock, return_value=trainer):
        configured = model.configure_optimizers()
    optimizer = configured["optimizer"]
    depth = len(model.backbone.blocks)
    rates = lr_of(optimizer, model.backbone)
    assert type(optimizer) is torch.optim.AdamW
    assert rates["head.weight"] == pytest.approx(cfg.optimizer.lr / 4)  # warmup step 0 of 4
    assert rates["cls_token"] == pytest.approx(cfg.optimizer.lr / 4 * 0.75 ** (depth + 1))
