"""The model's scale knobs change how it runs, never what it computes, and are off by default.

`model.grad_checkpointing` recomputes block activations in backward,
`model.attention_backend` pins the SDPA kernel, `model.channels_last` stores the
conv stems in NHWC memory. Each must give the default's outputs and gradients and
leave the state dict alone, and each test also shows that the knob took effect.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import vitlab.models.layers as layers
from tests.conftest import tiny_vit
from vitlab.errors import ConfigError
from vitlab.models import GMlp, MlpMixer, ResNetV2, VisionTransformer, from_official_npz
from vitlab.models.checkpoints import save_official_npz
from vitlab.runs.build import build_backbone

NUM_BLOCKS = 2


def tiny_hybrid(**knobs) -> VisionTransformer:
    return tiny_vit(image_size=32, patch_size=1, stem=ResNetV2((1, 1), width_factor=0.5), **knobs)


def tiny_mixer(**knobs) -> MlpMixer:
    return MlpMixer(
        image_size=16,
        patch_size=4,
        num_classes=10,
        hidden_dim=32,
        num_blocks=NUM_BLOCKS,
        tokens_mlp_dim=24,
        channels_mlp_dim=64,
        **knobs,
    )


def tiny_gmlp(**knobs) -> GMlp:
    return GMlp(
        image_size=16,
        patch_size=4,
        num_classes=10,
        hidden_dim=32,
        num_blocks=NUM_BLOCKS,
        ffn_dim=64,
        **knobs,
    )


def tiny_vit_with_dropout(**knobs) -> VisionTransformer:
    """Dropout shows that the recomputation replays the same masks."""
    return tiny_vit(dropout_rate=0.1, attention_dropout_rate=0.1, **knobs)


MODELS = {
    "vit": tiny_vit,
    "vit_dropout": tiny_vit_with_dropout,
    "hybrid": tiny_hybrid,
    "mixer": tiny_mixer,
    "gmlp": tiny_gmlp,
}


def randomized(model: nn.Module) -> nn.Module:
    """Every parameter random (the zero-initialised head would hide most of the graph)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.1)
    return model


def images(model: nn.Module, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(batch, 3, model.image_size, model.image_size) * 2 - 1


def logits_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One training-mode forward and backward from a fixed RNG state."""
    model.train().zero_grad()
    torch.manual_seed(2)
    logits = model(x)
    logits.square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def twins(make: Callable[..., nn.Module], **knobs) -> tuple[nn.Module, nn.Module]:
    """The default model and the same weights with `knobs` set."""
    plain = randomized(make())
    tuned = make(**knobs)
    tuned.load_state_dict(plain.state_dict())
    return plain, tuned


def assert_same_logits_and_grads(plain: nn.Module, tuned: nn.Module, **tolerance) -> None:
    x = images(plain)
    logits, grads = logits_and_grads(plain, x)
    tuned_logits, tuned_grads = logits_and_grads(tuned, x)
    torch.testing.assert_close(tuned_logits, logits, **tolerance)
    for (name, _), grad, tuned_grad in zip(
        plain.named_parameters(), grads, tuned_grads, strict=True
    ):
        torch.testing.assert_close(tuned_grad, grad, msg=name, **tolerance)


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes that autograd keeps from the forward for the backward."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x).sum()
    loss.backward()
    return total


@pytest.fixture
def checkpoint_calls(monkeypatch: pytest.MonkeyPatch) -> list[nn.Module]:
    """The modules that `torch.utils.checkpoint.checkpoint` is called on, in order."""
    calls: list[nn.Module] = []
    real = layers.checkpoint

    def spy(function, *args, **kwargs):
        calls.append(function)
        return real(function, *args, **kwargs)

    monkeypatch.setattr(layers, "checkpoint", spy)
    return calls


# --- model.grad_checkpointing ---------------------------------------------------------


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_grad_checkpointing_gives_the_same_logits_and_gradients(make) -> None:
    plain, tuned = twins(make, grad_checkpointing=True)
    assert_same_logits_and_grads(plain, tuned, rtol=0, atol=0)


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_grad_checkpointing_checkpoints_every_block_and_nothing_else(
    make, checkpoint_calls
) -> None:
    model = make(grad_checkpointing=True).train()
    model(images(model)).sum().backward()
    assert checkpoint_calls == list(model.blocks)


def test_grad_checkpointing_keeps_far_fewer_activations_for_backward() -> None:
    plain, tuned = twins(lambda **knobs: tiny_vit(num_layers=4, **knobs), grad_checkpointing=True)
    x = images(plain)
    assert saved_activation_bytes(tuned.train(), x) < saved_activation_bytes(plain.train(), x) / 4


def test_grad_checkpointing_is_skipped_in_eval_mode_and_without_grad(checkpoint_calls) -> None:
    model = tiny_vit(grad_checkpointing=True)
    x = images(model)
    model.eval()(x).sum().backward()
    with torch.no_grad():
        model.train()(x)
    assert checkpoint_calls == []


def test_grad_checkpointing_leaves_the_state_dict_alone() -> None:
    assert tiny_vit(grad_checkpointing=True).state_dict().keys() == tiny_vit().state_dict().keys()


# --- model.attention_backend ----------------------------------------------------------


def test_math_backend_gives_the_same_logits_and_gradients_as_auto() -> None:
    plain, tuned = twins(tiny_vit, attention_backend="math")
    assert_same_logits_and_grads(plain, tuned, rtol=1e-5, atol=1e-6)


def test_flash_backend_runs_on_the_cpu_and_equals_auto() -> None:
    """PyTorch has a CPU flash kernel (and "auto" picks it there), so flash is valid on CPU."""
    plain, tuned = twins(tiny_vit, attention_backend="flash")
    assert_same_logits_and_grads(plain, tuned, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["mem_efficient", "cudnn"])
def test_backend_without_a_cpu_kernel_fails_naming_the_key_and_what_runs(backend) -> None:
    model = tiny_vit(attention_backend=backend)
    with pytest.raises(
        ConfigError,
        match=rf"model.attention_backend='{backend}' has no kernel for this attention "
        r"\(cpu, torch.float32, head_dim 16\)\. On the CPU only 'math' and 'flash' exist",
    ):
        model(images(model))


def test_pinned_backend_also_applies_to_the_hybrids_blocks() -> None:
    model = tiny_hybrid(attention_backend="mem_efficient")
    with pytest.raises(ConfigError, match=r"model\.attention_backend='mem_efficient'"):
        model(images(model))


def test_unknown_backend_is_refused_when_the_model_is_built() -> None:
    with pytest.raises(
        ConfigError,
        match=r"model.attention_backend='flash2' is not one of "
        r"\['auto', 'math', 'flash', 'mem_efficient', 'cudnn'\]",
    ):
        tiny_vit(attention_backend="flash2")


def test_mixer_refuses_an_attention_backend_saying_it_has_no_attention() -> None:
    with pytest.raises(ConfigError, match=r"MlpMixer has no attention.*'flash'"):
        tiny_mixer(attention_backend="flash")


# --- model.channels_last --------------------------------------------------------------


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_channels_last_gives_the_same_logits_and_gradients(make) -> None:
    plain, tuned = twins(make, channels_last=True)
    assert_same_logits_and_grads(plain, tuned, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make", [tiny_vit, tiny_hybrid, tiny_mixer, tiny_gmlp], ids=["vit", "hybrid", "mixer", "gmlp"]
)
def test_channels_last_stores_every_conv_weight_nhwc(make) -> None:
    """1x1 kernels are left out: NCHW and NHWC are the same memory for them."""
    model = make(channels_last=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs
    for conv in convs:
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert not conv.weight.is_contiguous()


FIRST_CONV = {
    "vit": (tiny_vit, lambda model: model.patch_embed.proj),
    "hybrid": (tiny_hybrid, lambda model: model.stem),
    "mixer": (tiny_mixer, lambda model: model.stem.proj),
    "gmlp": (tiny_gmlp, lambda model: model.stem.proj),
}


@pytest.mark.parametrize(("make", "first_conv"), FIRST_CONV.values(), ids=FIRST_CONV.keys())
def test_channels_last_model_feeds_its_conv_stem_nhwc_images(make, first_conv) -> None:
    model = make(channels_last=True)
    seen: list[torch.Tensor] = []
    first_conv(model).register_forward_hook(
        lambda _, inputs, output: seen.extend([*inputs, output])
    )
    model(images(model))
    for tensor in seen:
        assert tensor.is_contiguous(memory_format=torch.channels_last)
        assert not tensor.is_contiguous()


@pytest.mark.parametrize("make", [tiny_hybrid, tiny_mixer], ids=["hybrid", "mixer"])
def test_channels_last_round_trips_the_official_npz(make, tmp_path: Path) -> None:
    model = randomized(make(channels_last=True)).eval()
    path = save_official_npz(model, tmp_path / "model.npz")
    rebuilt = from_official_npz(path).eval()
    x = images(model)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=1e-5, atol=1e-6)


# --- the config fields ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "attention_backend", "channels_last"),
    [("vit_tiny", "auto", False), ("r_vit_ti16", "auto", True), ("mixer_s16", None, False)],
)
def test_knob_defaults(make_cfg, model, attention_backend, channels_last) -> None:
    # Hybrids keep their ResNet stem channels-last by default: oneDNN's CPU convolutions
    # and the GPU's tensor cores both run NHWC faster (see the README's Speed section).
    cfg = make_cfg(f"model={model}")
    assert cfg.model.grad_checkpointing is False
    assert cfg.model.channels_last is channels_last
    assert cfg.model.attention_backend == attention_backend


def test_knobs_set_from_the_command_line_reach_the_model(make_cfg) -> None:
    backbone = build_backbone(
        make_cfg(
            "model.grad_checkpointing=true",
            "model.attention_backend=math",
            "model.channels_last=true",
        ).model
    )
    assert backbone.grad_checkpointing and backbone.channels_last
    assert {block.attn.attention_backend for block in backbone.blocks} == {"math"}


def test_bad_attention_backend_in_the_config_is_a_config_error(make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"model.attention_backend='fast' is not one of"):
        build_backbone(make_cfg("model.attention_backend=fast").model)


def test_attention_backend_on_a_mixer_config_is_a_config_error(make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"MlpMixer has no attention"):
        build_backbone(make_cfg("model=mixer_s16", "model.attention_backend=flash").model)
