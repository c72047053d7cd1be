"""The learning-rate schedules and the weight-decay split."""

import math

import pytest
import torch

from tests.conftest import tiny_vit
from vitlab.training.optim import constant, param_groups, warmup_cosine, warmup_linear


def _factors(make_schedule, total_steps: int, warmup_steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = make_schedule(optimizer, total_steps=total_steps, warmup_steps=warmup_steps)
    factors = []
    for _ in range(total_steps):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return factors


def test_warmup_rises_linearly_to_the_base_rate():
    factors = _factors(warmup_cosine, total_steps=20, warmup_steps=4)
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_decays_to_zero_at_the_last_step():
    factors = _factors(warmup_cosine, total_steps=21, warmup_steps=1)
    assert factors[1] == pytest.approx(1.0)
    assert factors[11] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20)))


def test_linear_decay_halves_at_the_midpoint():
    factors = _factors(warmup_linear, total_steps=11, warmup_steps=1)
    assert factors[6] == pytest.approx(0.5)


def test_constant_keeps_the_base_rate_after_warmup():
    assert _factors(constant, total_steps=6, warmup_steps=2) == pytest.approx([0.5, 1, 1, 1, 1, 1])


def test_warmup_longer_than_the_run_is_cut_to_it_with_one_warning():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.warns(
        UserWarning, match=r"warmup_steps=50 is more than the 10 optimizer steps"
    ) as seen:
        warmup_cosine(optimizer, total_steps=10, warmup_steps=50)
    assert len(seen) == 1
    assert _factors(warmup_cosine, total_steps=10, warmup_steps=50) == pytest.approx(
        _factors(warmup_cosine, total_steps=10, warmup_steps=10)
    )


def test_negative_warmup_is_refused():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps=-1 must be >= 0"):
        constant(optimizer, total_steps=10, warmup_steps=-1)


def test_weight_decay_skips_biases_norms_position_embedding_and_class_token():
    model = tiny_vit(num_layers=1)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    named = dict(model.named_parameters())
    for name in (
        "cls_token",
        "pos_embed.pos_embedding",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.bias",
        "head.bias",
    ):
        assert id(named[name]) in no_decay_ids, name
    for name in (
        "blocks.0.attn.qkv.weight",
        "blocks.0.mlp.fc1.weight",
        "patch_embed.proj.weight",
        "head.weight",
    ):
        assert id(named[name]) not in no_decay_ids, name
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
