"""gMLP: shapes, the gating unit's start, timm's architecture and numerics, the knobs, training.

timm is the reference (there is no official JAX gMLP): its parameter counts are
computed live here, and its weights, copied into ours by name, give the same logits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import hydra
import pytest
import timm
import torch
from omegaconf import OmegaConf

from vitlab.bench.timm_models import timm_model
from vitlab.errors import ConfigError
from vitlab.models import GMlp
from vitlab.models.gmlp import GMlpBlock, SpatialGatingUnit
from vitlab.runs.build import build_backbone
from vitlab.runs.tasks import train
from vitlab.runs.validate import check_run

# Our parameter names for timm's (`blocks.0.mlp_channels.fc1.weight` -> `blocks.0.channel_proj1.weight`).
TIMM_NAMES = {
    r"\.mlp_channels\.fc1\.": ".channel_proj1.",
    r"\.mlp_channels\.gate\.norm\.": ".sgu.norm.",
    r"\.mlp_channels\.gate\.proj\.": ".sgu.spatial_proj.",
    r"\.mlp_channels\.fc2\.": ".channel_proj2.",
}


def tiny_gmlp(**overrides) -> GMlp:
    """16x16 RGB, 4x4 patches (16 tokens), width 32, ffn 64, 2 blocks, 10 classes."""
    kwargs = dict(
        image_size=16, patch_size=4, num_classes=10, hidden_dim=32, num_blocks=2, ffn_dim=64
    )
    return GMlp(**{**kwargs, **overrides})


def timm_tiny(patch_norm: bool) -> torch.nn.Module:
    """timm's gMLP with `tiny_gmlp`'s dims, as `make bench` builds it."""
    cfg = dict(image_size=16, patch_size=4, num_classes=10, hidden_dim=32, num_blocks=2, ffn_dim=64)
    model, _ = timm_model({"_target_": "vitlab.models.GMlp", **cfg, "patch_norm": patch_norm})
    return model


def ours_from_timm(name: str) -> str:
    for pattern, replacement in TIMM_NAMES.items():
        name = re.sub(pattern, replacement, name)
    return name


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_logits_and_features_have_the_documented_shapes() -> None:
    model = tiny_gmlp().eval()
    images = torch.randn(3, 3, 16, 16)
    assert model(images).shape == (3, 10)
    assert model.forward_features(images).shape == (3, 16, 32)
    assert tiny_gmlp(num_classes=0)(images).shape == (3, 32)


def test_spatial_gating_unit_starts_by_passing_u_through() -> None:
    torch.manual_seed(0)
    sgu = SpatialGatingUnit(num_tokens=16, ffn_dim=64)
    x = torch.randn(2, 16, 64)
    u = x[..., :32]
    torch.testing.assert_close(sgu(x), u, atol=1e-4, rtol=0)
    assert sgu(x).shape == (2, 16, 32)


def test_spatial_gating_unit_gates_u_with_the_spatially_projected_v() -> None:
    torch.manual_seed(0)
    sgu = SpatialGatingUnit(num_tokens=16, ffn_dim=64)
    torch.nn.init.normal_(sgu.spatial_proj.weight)
    x = torch.randn(2, 16, 64)
    u, v = x.chunk(2, dim=-1)
    v = sgu.spatial_proj(sgu.norm(v).transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(sgu(x), u * v)


def test_an_odd_ffn_dim_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"ffn_dim=63 is odd.*must be even"):
        tiny_gmlp(ffn_dim=63)


@pytest.mark.parametrize(("name", "hidden_dim", "ffn_dim"), [
    ("gmlp_ti16_224", 128, 768),
    ("gmlp_s16_224", 256, 1536),
    ("gmlp_b16_224", 512, 3072),
])  # fmt: skip
def test_parameter_counts_equal_timms(name: str, hidden_dim: int, ffn_dim: int) -> None:
    with torch.device("meta"):
        theirs = timm.create_model(name, pretrained=False)
        ours = GMlp(224, 16, 1000, hidden_dim, 30, ffn_dim)
    assert count(ours) == count(theirs)


@pytest.mark.parametrize("patch_norm", [False, True])
def test_timms_weights_give_the_same_logits(patch_norm: bool) -> None:
    torch.manual_seed(0)
    theirs = timm_tiny(patch_norm)
    for p in theirs.parameters():  # every weight away from its init, the head included
        torch.nn.init.normal_(p, std=0.2)
    ours = tiny_gmlp(patch_norm=patch_norm)
    state = {ours_from_timm(k): v for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state)  # strict: the same names (after TIMM_NAMES) and shapes
    images = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(ours.eval()(images), theirs.eval()(images), atol=1e-5, rtol=1e-5)


def test_every_layer_norm_has_timms_eps() -> None:
    """Too small a difference to show in the logits: 1e-6 outside, 1e-5 in the gating unit."""
    theirs = timm_tiny(patch_norm=True)
    ours = dict(tiny_gmlp(patch_norm=True).named_modules())
    norms = {n: m for n, m in theirs.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert len(norms) == 2 + 2 * 2
    assert {n: ours[ours_from_timm(n + ".")[:-1]].eps for n in norms} == {
        n: m.eps for n, m in norms.items()
    }


@pytest.mark.parametrize("model", ["gmlp_tiny", "gmlp_s16"])
def test_bench_builds_timms_gmlp_with_our_parameter_count(make_cfg, model: str) -> None:
    cfg = make_cfg(f"model={model}", config_name="bench")
    with torch.device("meta"):
        ours = build_backbone(cfg.model)
        theirs, description = timm_model(OmegaConf.to_container(cfg.model, resolve=True))
    assert count(theirs) == count(ours)
    assert "gMLP" in description


def test_grad_checkpointing_gives_the_same_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    plain = tiny_gmlp()
    checkpointed = tiny_gmlp(grad_checkpointing=True)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.2)
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 16, 16)
    outputs = []
    for model in (plain, checkpointed):
        model.train()
        logits = model(images)
        logits.square().sum().backward()
        outputs.append((logits, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outputs[0][0], outputs[1][0])
    for plain_grad, checkpointed_grad in zip(outputs[0][1], outputs[1][1], strict=True):
        torch.testing.assert_close(plain_grad, checkpointed_grad)


def test_drop_path_rises_linearly_over_the_blocks() -> None:
    model = tiny_gmlp(num_blocks=3, drop_path_rate=0.2)
    assert [block.drop_path.rate for block in model.blocks] == pytest.approx([0.0, 0.1, 0.2])


def test_drop_path_is_the_identity_in_eval_mode() -> None:
    torch.manual_seed(0)
    plain = tiny_gmlp().eval()
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.2)
    dropping = tiny_gmlp(drop_path_rate=0.5).eval()
    dropping.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(dropping(images), plain(images), rtol=0, atol=0)


def test_drop_path_drops_while_training() -> None:
    torch.manual_seed(0)
    model = tiny_gmlp(drop_path_rate=0.9).train()
    images = torch.randn(8, 3, 16, 16)
    assert not torch.equal(model.forward_features(images), model.forward_features(images))


def test_patch_norm_adds_a_layer_norm_after_the_patch_projection() -> None:
    assert count(tiny_gmlp(patch_norm=True)) == count(tiny_gmlp()) + 2 * 32
    assert isinstance(tiny_gmlp(patch_norm=True).stem.norm, torch.nn.LayerNorm)


def test_a_patch_size_that_does_not_divide_the_image_is_refused() -> None:
    with pytest.raises(ValueError, match=r"patch_size=5 does not divide image_size=16"):
        tiny_gmlp(patch_size=5)


def test_a_position_encoding_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"no position encoding.*model\.pos_embed"):
        tiny_gmlp(pos_embed="learned")


def test_an_attention_backend_is_refused_saying_there_is_no_attention() -> None:
    with pytest.raises(ConfigError, match=r"no attention layers.*model\.attention_backend"):
        tiny_gmlp(attention_backend="flash")


def test_fsdp_makes_each_gmlp_block_a_unit(make_cfg) -> None:
    model = tiny_gmlp()
    strategy = hydra.utils.instantiate(make_cfg("trainer=fsdp").trainer.strategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    units = set(policy._run_policy(model, ignored_modules=set(), root_kwargs={}))
    assert units == {m for m in model.modules() if isinstance(m, GMlpBlock)}
    assert len(units) == 2


def test_the_s16_config_at_224_passes_validation(make_cfg) -> None:
    check_run(make_cfg("model=gmlp_s16", "data.image_size=224"))


def test_a_config_patch_size_that_does_not_divide_the_image_is_refused_before_training(
    make_cfg,
) -> None:
    with pytest.raises(ConfigError, match=r"model.patch_size=5.*valid patch sizes"):
        train(make_cfg("model=gmlp_tiny", "model.patch_size=5"))


def test_gmlp_tiny_trains_a_few_steps_on_digits(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "model=gmlp_tiny",
        "trainer.max_steps=3",
        "callbacks.progress_bar=null",
    )
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
