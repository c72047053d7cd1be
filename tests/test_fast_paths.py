"""The speed paths of `vitlab.models.fast` compute what the plain formulation computes.

Each fast path (`make bench` measures what it buys) is checked against the
straightforward computation it replaces, forward and backward:

- a class-token ViT runs its last block for the class token only
  (`fast.class_token_block`), against `forward_head(forward_features(x))`, with
  token merging too (its proportional attention reaches that block);
- Mixer's token mixing multiplies from the left with the residual folded in
  (`fast.token_mixing`), against the paper's transposed `MixerBlock.mix_tokens`;
- a StdConv2d pads symmetric SAME padding inside the conv (`fast.conv2d_padded`),
  against `pad_same`; the ResNet's ReLUs work in place (`fast.relu_in_place`);
- without autograd, the MLPs' GELU overwrites its input (`fast.gelu_in_place`), or
  runs inside the first layer's matmul on a CPU (`fast.fused_linear_gelu`), against
  the same model with autograd on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from tests.conftest import tiny_vit
from tests.test_scale_knobs import images, randomized, tiny_hybrid, tiny_mixer
from vitlab.models import ResNetV2, fast
from vitlab.models.fast import fused_linear_gelu
from vitlab.models.layers import Mlp
from vitlab.models.resnet import WEIGHT_STANDARDIZATION_EPS, StdConv2d, pad_same


def full_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every block over every token, then pooling: the computation `forward` shortens."""
    return model.forward_head(model.forward_features(x))


def outputs_and_grads(model: nn.Module, run, x: torch.Tensor):
    model.zero_grad()
    out = run(x)
    out.square().mean().backward()
    # A parameter the output does not reach has no grad in one path, zeros in the other.
    return out.detach(), {
        name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for name, p in model.named_parameters()
    }


CLASS_TOKEN_MODELS = {
    "learned": lambda: tiny_vit(),
    "sincos2d": lambda: tiny_vit(pos_embed="sincos2d"),
    "none": lambda: tiny_vit(pos_embed="none"),
    "conditional": lambda: tiny_vit(pos_embed="conditional"),
    "conditional_one_block": lambda: tiny_vit(pos_embed="conditional", num_layers=1),
    "rope2d": lambda: tiny_vit(pos_embed="rope2d"),
    "hybrid": tiny_hybrid,
    "checkpointed": lambda: tiny_vit(grad_checkpointing=True),
    "token_merging": lambda: tiny_vit(token_merging=3),  # proportional attention in the last block
}


@pytest.mark.parametrize("make", CLASS_TOKEN_MODELS.values(), ids=CLASS_TOKEN_MODELS.keys())
def test_class_token_forward_matches_the_full_encoder(make) -> None:
    model = randomized(make()).train()
    assert model.classifier == "token"
    x = images(model, batch=3)
    logits, grads = outputs_and_grads(model, model, x)
    full_logits, full_grads = outputs_and_grads(model, lambda x: full_forward(model, x), x)
    torch.testing.assert_close(logits, full_logits, rtol=1e-5, atol=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_class_token_forward_skips_the_last_blocks_patch_tokens(monkeypatch) -> None:
    """The shortcut is taken: the last MLP sees one token per image, the others all of them."""
    model = randomized(tiny_vit(num_layers=3)).eval()
    widths = []
    for block in model.blocks:
        block.mlp.register_forward_hook(lambda _, args, out: widths.append(args[0].shape[1]))
    with torch.no_grad():
        model(images(model, batch=2))
    tokens = 1 + model.grid[0] * model.grid[1]
    assert widths == [tokens, tokens, 1]


def test_gap_classifier_still_runs_every_token() -> None:
    model = randomized(tiny_vit(classifier="gap")).train()
    x = images(model)
    logits, _ = outputs_and_grads(model, model, x)
    torch.testing.assert_close(logits, full_forward(model, x).detach())


def test_mixer_token_mixing_matches_the_transposed_mlp() -> None:
    model = randomized(tiny_mixer()).train()
    block = model.blocks[0]
    torch.manual_seed(3)
    x = torch.randn(3, model.grid[0] * model.grid[1], model.hidden_dim)

    def transposed(x: torch.Tensor) -> torch.Tensor:
        y = rearrange(block.norm1(x), "b n c -> b c n")
        return x + rearrange(block.token_mixing(y), "b c n -> b n c")

    def folded(x: torch.Tensor) -> torch.Tensor:
        return fast.token_mixing(block.token_mixing, block.norm1(x), x)

    fast_out, fast_grads = outputs_and_grads(block, folded, x)
    plain, plain_grads = outputs_and_grads(block, transposed, x)
    torch.testing.assert_close(fast_out, plain, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_mixer_block_is_the_papers_token_then_channel_mixing() -> None:
    """The block, fast path included, is x + mix_tokens(LN(x)), then x + ChannelMLP(LN(x))."""
    model = randomized(tiny_mixer()).train()
    block = model.blocks[0]
    torch.manual_seed(3)
    x = torch.randn(3, model.grid[0] * model.grid[1], model.hidden_dim)
    y = x + block.mix_tokens(block.norm1(x))
    expected = y + block.channel_mixing(block.norm2(y))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kernel_size", "stride", "size"),
    [(3, 1, 8), (3, 1, 7), (3, 2, 8), (3, 2, 7), (1, 2, 8), (7, 2, 16), (7, 2, 15)],
)
def test_std_conv_same_padding_matches_explicit_padding(kernel_size, stride, size) -> None:
    torch.manual_seed(0)
    conv = StdConv2d(4, 6, kernel_size, stride)
    x = torch.randn(2, 4, size, size)
    std, mean = torch.std_mean(conv.weight, dim=(1, 2, 3), correction=0, keepdim=True)
    weight = (conv.weight - mean) / (std + WEIGHT_STANDARDIZATION_EPS)
    expected = F.conv2d(pad_same(x, kernel_size, stride), weight, stride=stride)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_resnet_in_place_relus_give_the_out_of_place_gradients(monkeypatch) -> None:
    """The ReLUs after GroupNorm and after the residual sum work in place (GroupNorm and
    addition keep nothing of their outputs for backward): same gradients as out of place."""
    stem = randomized(ResNetV2((1, 1), width_factor=0.5))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        stem.zero_grad()
        x.grad = None
        stem(x).square().mean().backward()
        return x.grad.clone(), [p.grad.clone() for p in stem.parameters()]

    in_place = run()
    relu = F.relu
    monkeypatch.setattr(F, "relu", lambda t, inplace=False: relu(t))
    out_of_place = run()
    torch.testing.assert_close(in_place, out_of_place)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_overwrites_its_input_only_where_autograd_keeps_nothing(approximate) -> None:
    mlp = Mlp(8, 16, gelu_approximate=approximate)
    h = torch.randn(4, 16)
    expected = F.gelu(h, approximate=approximate)
    with torch.no_grad():
        given = h.clone()
        out = fast.gelu_in_place(given, mlp.act)
    assert out.data_ptr() == given.data_ptr(), "no second buffer without autograd"
    assert torch.equal(out, expected), "the same kernel: the same bits"
    with torch.inference_mode():
        given = h.clone()
        assert fast.gelu_in_place(given, mlp.act).data_ptr() == given.data_ptr()
    # With autograd, backward needs the GELU's input: it must be left as it was.
    given = h.clone().requires_grad_()
    out = fast.gelu_in_place(given, mlp.act)
    assert out.data_ptr() != given.data_ptr()
    assert torch.equal(given.detach(), h)
    out.sum().backward()
    assert given.grad is not None


def test_fused_linear_gelu_is_the_plain_linear_then_gelu() -> None:
    linear = nn.Linear(24, 40)
    x = torch.randn(2, 7, 24)
    for approximate in ("tanh", "none"):
        plain = F.gelu(linear(x), approximate=approximate).detach()
        with torch.no_grad():
            fused = fused_linear_gelu(x, linear, approximate)
            # Mixer reads its tokens transposed: a strided view, not a copy
            transposed = fused_linear_gelu(x.mT.contiguous().mT, linear, approximate)
        assert fused is not None and fused.shape == (2, 7, 40)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(transposed, plain, rtol=1e-5, atol=1e-6)


def test_fused_linear_gelu_steps_aside_where_it_does_not_apply() -> None:
    linear, x = nn.Linear(8, 16), torch.randn(3, 8)
    assert fused_linear_gelu(x, linear, "tanh") is None, "autograd records it: no backward"
    with torch.no_grad():
        assert fused_linear_gelu(x.double(), linear.double(), "tanh") is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fused_linear_gelu(x, linear, "tanh") is None
    frozen = nn.Linear(8, 16).requires_grad_(False)
    assert fused_linear_gelu(x, frozen, "tanh") is not None, "nothing to record"


@pytest.mark.parametrize(
    "make", [tiny_vit, tiny_mixer, tiny_hybrid], ids=["vit", "mixer", "hybrid"]
)
def test_inference_without_autograd_gives_the_logits_of_a_graphed_forward(
    make, monkeypatch
) -> None:
    model = randomized(make()).eval()
    x = images(model, batch=3)
    graphed = model(x)
    assert graphed.requires_grad
    calls = []
    real = fast.fused_linear_gelu

    def counted(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fast, "fused_linear_gelu", counted)
    for no_graph in (torch.inference_mode, torch.no_grad):
        with no_graph():
            torch.testing.assert_close(model(x), graphed.detach(), rtol=1e-5, atol=1e-6)
    assert calls and all(calls), "every MLP took the fused kernel"
