"""`vitlab.training.flops`: FLOPs counted on the meta device, and the measured peak MFU divides by."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import tiny_vit
from vitlab.training.flops import count_flops, measure_peak_flops, precision_dtype


def two_linears() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5))


def test_forward_flops_are_two_per_multiply_accumulate():
    assert count_flops(two_linears(), (3, 10), train=False) == 2 * 3 * (10 * 20 + 20 * 5)


def test_training_flops_add_the_backward_matmuls():
    forward = 2 * 3 * (10 * 20 + 20 * 5)
    # Backward: both weight gradients, and the input gradient of the second layer only
    # (the images need none).
    backward = 2 * 3 * (10 * 20 + 20 * 5) + 2 * 3 * 20 * 5
    assert count_flops(two_linears(), (3, 10), train=True) == forward + backward


def test_vit_forward_flops_match_the_formula_attention_included():
    """FlopCounterMode has no formula for the CPU's fused attention kernel; ours counts it anyway."""
    model = tiny_vit()  # 16x16x3 input, 4x4 patches, width 32, 2 layers, MLP 64, 10 classes
    tokens, width, mlp, patches = 17, 32, 64, 16
    patch_embed = 2 * patches * (4 * 4 * 3) * width
    qkv = 2 * tokens * width * 3 * width
    attention = 2 * (2 * tokens * tokens * width)  # q kᵀ and weights @ v, all heads
    out = 2 * tokens * width * width
    mlp_flops = 2 * (2 * tokens * width * mlp)
    head = 2 * width * 10
    # The last block runs for the class token only (`models.fast.class_token_block`): keys and
    # values of every token, then one query, one output projection, one MLP row.
    last_block = (
        2 * tokens * width * 2 * width
        + 2 * width * width
        + 2 * (2 * tokens * width)
        + 2 * width * width
        + 2 * (2 * width * mlp)
    )
    expected = patch_embed + (qkv + attention + out + mlp_flops) + last_block + head
    assert count_flops(model, (1, 3, 16, 16), train=False) == expected


def test_counting_changes_neither_weights_nor_random_state():
    model = tiny_vit(dropout_rate=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    count_flops(model, (2, 3, 16, 16), train=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_flops_scale_with_the_batch():
    model = tiny_vit()
    assert count_flops(model, (4, 3, 16, 16)) == 4 * count_flops(model, (1, 3, 16, 16))


def test_peak_is_a_positive_flop_rate_and_leaves_the_random_state_alone():
    rng = torch.get_rng_state()
    assert measure_peak_flops("cpu", torch.float32, size=128, repeats=1) > 0
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16), ("16-true", torch.float16)],
)
def test_precision_names_its_compute_dtype(precision, dtype):
    assert precision_dtype(precision) is dtype


def test_a_precision_without_one_dtype_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"trainer.precision='transformer-engine'"):
        precision_dtype("transformer-engine")


@pytest.mark.parametrize(
    ("flops_per_second", "size"),
    [(1e12, 2048), (2e9, 512), (1e6, 256)],  # fast fp32, emulated bf16, hopeless
)
def test_the_peak_matmul_grows_only_while_one_takes_under_the_time_limit(
    monkeypatch, flops_per_second, size
):
    """An emulated dtype (bf16 on an AVX2 CPU) must not make the first MFU log wait minutes."""
    from vitlab.training import flops

    def fake_seconds(a, b, device):
        return 2 * a.shape[0] ** 3 / flops_per_second

    monkeypatch.setattr(flops, "_matmul_seconds", fake_seconds)
    monkeypatch.setattr(flops, "_square_operands", lambda d, t, n: (torch.empty(n, 0), None))
    assert flops.peak_matmul_size("cpu", torch.bfloat16) == size
