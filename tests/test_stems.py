"""`model.stem` (patch, conv, patchify_ln, resnet) and `model.patch_norm`: shapes, refusals,
parameter counts, the hybrids unchanged, and short training runs on the default config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from tests.conftest import tiny_vit
from vitlab.bench.timm_models import timm_model
from vitlab.errors import CheckpointError, ConfigError
from vitlab.models import MlpMixer, ResNetV2, VisionTransformer
from vitlab.models.checkpoints.layout import official_links
from vitlab.models.stems import ConvStem, PatchifyLN, conv_stem_widths
from vitlab.runs.build import build_backbone
from vitlab.runs.tasks import train
from vitlab.runs.validate import check_run


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tokens_and_map(model: VisionTransformer, image_size: int) -> tuple[torch.Size, torch.Size]:
    """The stem's feature map and the tokens entering block 0, for two images."""
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        return model.stem(x).shape, model.embed(x)[0].shape


@pytest.mark.parametrize(("image_size", "patch_size"), [(48, 16), (40, 8), (24, 4), (6, 2)])
def test_conv_stem_strides_by_the_patch_size_and_gives_one_token_per_patch(image_size, patch_size):
    model = tiny_vit(image_size=image_size, patch_size=patch_size, stem="conv")
    side = image_size // patch_size
    feature_map, tokens = tokens_and_map(model, image_size)
    assert feature_map == (2, 32, side, side)  # the last 3x3 conv is as wide as the model
    assert tokens == (2, 1 + side * side, 32)
    assert model.stem.stride == patch_size
    assert model.patch_embed.patch_size == 1  # the paper's closing 1x1 convolution


@pytest.mark.parametrize(("image_size", "patch_size"), [(48, 16), (40, 8), (36, 12), (20, 4)])
def test_patchify_ln_stem_maps_to_a_quarter_and_the_embedding_cuts_quarter_patches(
    image_size, patch_size
):
    model = tiny_vit(image_size=image_size, patch_size=patch_size, stem="patchify_ln")
    side = image_size // patch_size
    feature_map, tokens = tokens_and_map(model, image_size)
    assert feature_map[2:] == (image_size // 4, image_size // 4)
    assert tokens == (2, 1 + side * side, 32)
    assert model.patch_embed.patch_size == patch_size // 4


def test_resnet_stem_counts_patches_in_feature_map_cells():
    model = tiny_vit(
        image_size=48, patch_size=2, stem="resnet", resnet_layers=(1, 1), resnet_width_factor=0.5
    )
    feature_map, tokens = tokens_and_map(model, 48)
    assert isinstance(model.stem, ResNetV2)
    assert feature_map[2:] == (6, 6)  # root /4, second stage /2
    assert tokens == (2, 1 + 3 * 3, 32)


@pytest.mark.parametrize("patch_size", [1, 3, 6, 12])
def test_conv_stem_refuses_a_patch_size_that_is_not_a_power_of_two(patch_size):
    with pytest.raises(
        ConfigError,
        match=rf"model.patch_size={patch_size} is not valid: model.stem=conv .*power of two >= 2: 2, 4, 8, 16",
    ):
        tiny_vit(image_size=48, patch_size=patch_size, stem="conv")


@pytest.mark.parametrize("patch_size", [2, 6, 10])
def test_patchify_ln_stem_refuses_a_patch_size_that_is_not_a_multiple_of_four(patch_size):
    with pytest.raises(
        ConfigError,
        match=rf"model.patch_size={patch_size} is not valid: model.stem=patchify_ln .*multiple of 4: 4, 8, 12",
    ):
        tiny_vit(image_size=60, patch_size=patch_size, stem="patchify_ln")


@pytest.mark.parametrize("stem", ["conv", "patchify_ln"])
def test_pixel_stems_refuse_patches_that_do_not_tile_the_image(stem):
    with pytest.raises(ValueError, match=r"patch_size=16 does not divide image_size=40"):
        tiny_vit(image_size=40, patch_size=16, stem=stem)


def test_conv_stem_widths_follow_the_papers_small_models():
    assert conv_stem_widths(192, 16) == [24, 48, 96, 192]  # ViT_C-1GF
    assert conv_stem_widths(384, 16) == [48, 96, 192, 384]  # ViT_C-4GF
    assert conv_stem_widths(64, 4) == [32, 64]


def test_conv_stem_has_a_bias_free_conv_and_a_batchnorm_per_layer():
    stem = ConvStem(3, [24, 48, 96, 192])
    convs = sum(9 * a * b for a, b in [(3, 24), (24, 48), (48, 96), (96, 192)])
    norms = 2 * (24 + 48 + 96 + 192)
    assert count(stem) == convs + norms
    assert (stem.out_channels, stem.stride) == (192, 16)


def test_patchify_ln_stem_has_a_4x4_conv_and_a_layernorm():
    stem = PatchifyLN(3, 48)
    assert count(stem) == (4 * 4 * 3 * 48 + 48) + 2 * 48
    assert (stem.out_channels, stem.stride) == (48, 4)


def test_patchify_ln_map_gives_each_patch_the_models_width_of_values():
    model = tiny_vit(image_size=32, patch_size=16, hidden_size=32, stem="patchify_ln")
    assert model.stem.out_channels * (16 // 4) ** 2 == 32


@pytest.mark.parametrize("stem", ["patch", "conv", "patchify_ln"])
def test_patch_norm_adds_exactly_a_layernorm_of_the_width(stem):
    plain = tiny_vit(image_size=32, patch_size=8, stem=stem)
    normed = tiny_vit(image_size=32, patch_size=8, stem=stem, patch_norm=True)
    assert count(normed) - count(plain) == 2 * 32
    added = set(normed.state_dict()) - set(plain.state_dict())
    assert added == {"patch_embed.norm.weight", "patch_embed.norm.bias"}


def test_patch_norm_normalises_each_token():
    model = tiny_vit(patch_norm=True)
    tokens, _ = model.patch_embed(torch.randn(2, 3, 16, 16))
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)


def test_mixer_patch_norm_adds_exactly_a_layernorm_of_the_width():
    kwargs = dict(
        image_size=16,
        patch_size=4,
        num_classes=10,
        hidden_dim=32,
        num_blocks=1,
        tokens_mlp_dim=16,
        channels_mlp_dim=64,
    )
    assert count(MlpMixer(**kwargs, patch_norm=True)) - count(MlpMixer(**kwargs)) == 2 * 32


@pytest.mark.parametrize("knobs", [{"stem": "conv"}, {"stem": "patchify_ln"}, {"patch_norm": True}])
def test_the_official_layout_refuses_what_the_original_does_not_have(knobs):
    with pytest.raises(CheckpointError):
        official_links(tiny_vit(**knobs))


@pytest.mark.parametrize("stem", ["conv", "patchify_ln"])
def test_channels_last_conv_stems_give_the_same_outputs(stem):
    x = torch.randn(2, 3, 16, 16)
    outputs = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = tiny_vit(stem=stem, num_classes=0, channels_last=channels_last).eval()
        with torch.no_grad():
            outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def _meta_backbone(model_cfg: DictConfig) -> torch.nn.Module:
    with torch.device("meta"):  # shapes only: no memory, no init time
        return build_backbone(model_cfg)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _old_style(model_cfg: DictConfig) -> DictConfig:
    """The hybrid's config as runs saved it before `stem: resnet`: a `_target_` stem node."""
    old = OmegaConf.to_container(model_cfg, resolve=True)
    old["stem"] = {
        "_target_": "vitlab.models.ResNetV2",
        "num_layers": old.pop("resnet_layers"),
        "width_factor": old.pop("resnet_width_factor"),
        "num_channels": old["num_channels"],
    }
    return OmegaConf.create(old)


def test_stem_resnet_builds_the_same_hybrid_as_a_resnet_stem_node(make_cfg):
    cfg = make_cfg("model=r26_vit_s32")
    assert cfg.model.stem == "resnet"
    ours = _meta_backbone(cfg.model)
    old = _meta_backbone(_old_style(cfg.model))
    assert isinstance(ours.stem, ResNetV2) and isinstance(old.stem, ResNetV2)
    assert list(_shapes(ours).items()) == list(_shapes(old).items())


def test_a_saved_config_with_a_resnet_stem_node_passes_validation(make_cfg):
    cfg = make_cfg("model=r50_vit_b16")
    with open_dict(cfg):
        cfg.model = _old_style(cfg.model)
    check_run(cfg)


def test_a_saved_config_with_a_resnet_stem_node_is_still_checked_against_the_image(make_cfg):
    cfg = make_cfg("model=r50_vit_b16", "data.image_size=40")
    with open_dict(cfg):
        cfg.model = _old_style(cfg.model)
    with pytest.raises(ConfigError, match=r"does not divide the stem's 2x2 feature map"):
        check_run(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.stem=conv", "model.patch_size=12"], r"model.patch_size=12 is not valid: model.stem=conv"),
        (["model.stem=patchify_ln", "model.patch_size=2"], r"model.patch_size=2 is not valid: model.stem=patchify_ln"),
        (["model.stem=conv", "model.patch_size=16", "data.image_size=40"], r"patch_size=16 does not divide image_size=40"),
        (["model.stem=resnet"], r"patch_size=4 does not divide the stem's 2x2 feature map"),
        (["model.stem=banana"], r"model.stem='banana' is not valid: expected one of 'patch', 'conv', 'patchify_ln', 'resnet'"),
    ],
)  # fmt: skip
def test_validation_refuses_a_patch_size_the_stem_cannot_make(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_run(make_cfg(*overrides))


@pytest.mark.parametrize("patch_norm", ["false", "true"])
@pytest.mark.parametrize("stem", ["patch", "conv", "patchify_ln"])
def test_each_stem_of_the_sweep_passes_validation_and_builds(make_cfg, stem, patch_norm):
    cfg = make_cfg(f"model.stem={stem}", f"model.patch_norm={patch_norm}")
    check_run(cfg)
    model = build_backbone(cfg.model)
    with torch.no_grad():
        logits = model(
            torch.randn(2, cfg.data.num_channels, cfg.data.image_size, cfg.data.image_size)
        )
    assert logits.shape == (2, cfg.data.num_classes)


@pytest.mark.parametrize(
    "overrides", [["model.stem=conv"], ["model.stem=patchify_ln"], ["model.patch_norm=true"]]
)
def test_a_few_training_steps_run_with_the_option(make_cfg, tmp_path: Path, overrides):
    cfg = make_cfg(
        *overrides,
        "trainer.max_steps=3",
        "scheduler.warmup_steps=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "callbacks.progress_bar=null",
    )
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0


@pytest.mark.parametrize("model", ["vit_tiny", "mixer_b16"])
def test_timm_contender_of_a_patch_norm_model_has_our_parameter_count(make_cfg, model):
    cfg = make_cfg(f"model={model}", "model.patch_norm=true", config_name="bench")
    with torch.device("meta"):
        theirs, _ = timm_model(cfg.model)
        assert count(theirs) == count(build_backbone(cfg.model))


def test_timm_has_no_contender_for_a_conv_stem(make_cfg):
    cfg = make_cfg("model.stem=conv", config_name="bench")
    with pytest.raises(ConfigError, match=r"model.stem='conv' has no timm counterpart"):
        timm_model(cfg.model)


def test_the_conv_stem_takes_the_place_of_one_encoder_block_as_in_the_paper():
    """Xiao et al.'s ViT_C: the conv stack in, one transformer block out, so the compute stays."""
    assert len(tiny_vit(num_layers=3, stem="conv").blocks) == 2
    assert len(tiny_vit(num_layers=3, stem="patchify_ln").blocks) == 3
    assert len(tiny_vit(num_layers=3).blocks) == 3
    with pytest.raises(ConfigError, match=r"model.num_layers=1 is not valid with model.stem=conv"):
        tiny_vit(num_layers=1, stem="conv")
