"""timm's models and checkpoint files: `from_timm`, `to_timm` and `model.pretrained=<.pth|.safetensors>`.

Every family is checked against a randomly initialised timm model (its parameters
then perturbed, so that a zero head or a dropped tensor shows): the architecture
read from the weights, the logits to 1e-5 in float32, and the state dict both ways.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import GatedMlp
from timm.models.mlp_mixer import MlpMixer as TimmMixer
from timm.models.mlp_mixer import SpatialGatingBlock
from torch import nn

from vitlab.errors import CheckpointError
from vitlab.models import GMlp, MlpMixer, VisionTransformer, from_timm, load_pretrained
from vitlab.models.checkpoints import to_timm
from vitlab.models.resnet import NormEps
from vitlab.runs.build import build_backbone
from vitlab.runs.tasks import train

# timm's Mixer and gMLP names fix num_blocks, so those are built from timm's class directly.
TIMM_MODELS: dict[str, Callable[[], nn.Module]] = {
    "vit_token": lambda: timm.create_model(
        "vit_tiny_patch16_224", num_classes=7, img_size=32, patch_size=8, depth=2
    ),
    "vit_gap": lambda: timm.create_model(
        "vit_base_patch16_gap_224",
        num_classes=7,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=96,
    ),
    "mixer": lambda: TimmMixer(
        num_classes=7, img_size=32, patch_size=8, num_blocks=2, embed_dim=64
    ),
    "gmlp": lambda: TimmMixer(
        num_classes=7,
        img_size=32,
        patch_size=8,
        num_blocks=2,
        embed_dim=64,
        mlp_ratio=6,
        block_layer=SpatialGatingBlock,
        mlp_layer=GatedMlp,
    ),
    "vit_patch_norm": lambda: timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=7,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_norm_layer="layernorm",
    ),
    "mixer_stem_norm": lambda: TimmMixer(
        num_classes=7, img_size=32, patch_size=8, num_blocks=2, embed_dim=64, stem_norm=True
    ),
    "r26_hybrid": lambda: timm.create_model(
        "vit_small_r26_s32_224", num_classes=7, img_size=64, depth=2, embed_dim=96, num_heads=3
    ),
    "r_ti_hybrid": lambda: timm.create_model(
        "vit_tiny_r_s16_p8_224", num_classes=7, img_size=64, depth=2
    ),
}
OUR_CLASS = {"mixer": MlpMixer, "mixer_stem_norm": MlpMixer, "gmlp": GMlp}


def perturbed(model: nn.Module) -> nn.Module:
    """`model` with every parameter moved by N(0, 0.05): no zero head, nothing left at its init."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


@functools.cache
def timm_model(family: str) -> nn.Module:
    torch.manual_seed(0)
    return perturbed(TIMM_MODELS[family]())


@functools.cache
def ours_of(family: str) -> nn.Module:
    return from_timm(timm_model(family))


def images(size: int) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("family", TIMM_MODELS)
def test_from_timm_gives_timms_logits(family: str) -> None:
    reference, ours = timm_model(family), ours_of(family)
    x = images(ours.image_size)
    torch.testing.assert_close(logits(ours, x), logits(reference, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", TIMM_MODELS)
def test_from_timm_builds_our_class_of_timms_architecture(family: str) -> None:
    reference, ours = timm_model(family), ours_of(family)
    assert type(ours) is OUR_CLASS.get(family, VisionTransformer)
    assert ours.num_classes == reference.num_classes == 7
    embedding = reference.stem if isinstance(reference, TimmMixer) else reference.patch_embed
    assert ours.patch_size == embedding.patch_size[0]
    assert len(ours.blocks) == len(reference.blocks) == 2
    if isinstance(ours, VisionTransformer):
        assert ours.hidden_size == reference.embed_dim
        assert ours.classifier == ("gap" if family == "vit_gap" else "token")
        assert ours.blocks[0].attn.num_heads == reference.blocks[0].attn.num_heads
    else:
        assert ours.hidden_dim == reference.embed_dim


@pytest.mark.parametrize("family", ["r26_hybrid", "r_ti_hybrid"])
def test_hybrid_stem_has_timms_stages_and_normalisation_constants(family: str) -> None:
    reference, ours = timm_model(family), ours_of(family)
    backbone = reference.patch_embed.backbone
    stages = getattr(backbone, "stages", [])
    assert ours.stem.num_layers == tuple(len(stage.blocks) for stage in stages)
    assert ours.stem.eps == NormEps(group_norm=1e-5, weight_standardization=1e-8, inside_sqrt=True)
    assert ours.stem.gn_root.eps == 1e-5


def test_default_resnet_keeps_the_originals_constants() -> None:
    ours = VisionTransformer(
        image_size=64, patch_size=1, num_classes=0, hidden_size=32, num_layers=1, num_heads=2,
        mlp_dim=64, stem="resnet", resnet_layers=(1,),
    )  # fmt: skip
    assert ours.stem.eps == NormEps(group_norm=1e-6, weight_standardization=1e-5, inside_sqrt=False)


@pytest.mark.parametrize("family", TIMM_MODELS)
def test_to_timm_gives_back_timms_state_dict(family: str) -> None:
    reference = timm_model(family)
    state = reference.state_dict()
    written = to_timm(ours_of(family))
    assert written.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(written[name], tensor), name


def test_a_state_dict_with_the_timm_name_gets_that_models_heads() -> None:
    """vit_base_patch16_gap_224 has 16 heads of 48: no head_dim rule could tell, the registry does."""
    torch.manual_seed(0)
    reference = perturbed(
        timm.create_model("vit_base_patch16_gap_224", num_classes=3, img_size=32, depth=1)
    )
    ours = from_timm(reference.state_dict(), name="vit_base_patch16_gap_224")
    assert ours.blocks[0].attn.num_heads == 16
    x = images(32)
    torch.testing.assert_close(logits(ours, x), logits(reference, x), atol=1e-5, rtol=1e-5)


def test_a_vit_state_dict_without_a_name_is_refused_asking_for_one() -> None:
    with pytest.raises(CheckpointError, match=r"number of attention heads.*name='vit_base"):
        from_timm(timm_model("vit_token").state_dict())


def test_a_name_timm_does_not_know_is_refused() -> None:
    with pytest.raises(CheckpointError, match=r"name='vit_tiny_patch99' is not a timm model name"):
        from_timm(timm_model("vit_token").state_dict(), name="vit_tiny_patch99")


def test_a_name_of_another_width_is_refused() -> None:
    with pytest.raises(CheckpointError, match=r"width 192.*width 768"):
        from_timm(timm_model("vit_token").state_dict(), name="vit_base_patch16_224")


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"global_pool": "avg", "class_token": False}, "fc_norm"),
        ({"init_values": 1e-5}, "layer scale"),
        ({"reg_tokens": 2}, "register tokens"),
        ({"no_embed_class": True}, "no_embed_class"),
        ({"global_pool": "avg", "fc_norm": False}, "global_pool='avg' and a class token"),
    ],
)
def test_timm_options_vit_does_not_have_are_refused_naming_them(kwargs: dict, option: str) -> None:
    reference = timm.create_model(
        "vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=1, **kwargs
    )
    with pytest.raises(CheckpointError, match=option):
        from_timm(reference)


# model.pretrained=<timm file>: vit_tiny's architecture on 32x32 synthetic images.
VIT_TINY = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4}


def vit_tiny_overrides(*extra: str) -> list[str]:
    return [
        "model=vit_tiny",
        "model.gelu_approximate=none",
        "data=synthetic",
        "data.image_size=32",
        "data.num_classes=10",
        *extra,
    ]


def timm_vit_tiny(**overrides) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {**VIT_TINY, "mlp_ratio": 2.0, "num_classes": 10, **overrides}
    return perturbed(timm.create_model("vit_tiny_patch16_224", **kwargs))


def save_pth(model: nn.Module, path: Path) -> Path:
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)  # as timm's train.py nests it
    return path


def save_safetensors(model: nn.Module, path: Path) -> Path:
    save_file(model.state_dict(), path)
    return path


@pytest.mark.parametrize(
    ("suffix", "save"), [(".pth", save_pth), (".safetensors", save_safetensors)]
)
def test_pretrained_timm_file_loads_and_trains(suffix, save, make_cfg, tmp_path) -> None:
    reference = timm_vit_tiny()
    file = save(reference, tmp_path / f"vit_tiny{suffix}")
    cfg = make_cfg(
        *vit_tiny_overrides(
            f"model.pretrained={file}",
            "data.batch_size=16",
            "data.num_samples=32",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            "scheduler.warmup_steps=1",
        )
    )
    x = images(32)
    torch.testing.assert_close(
        logits(build_backbone(cfg.model), x), logits(reference, x), atol=1e-5, rtol=1e-5
    )
    train(cfg)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    trained = checkpoint["state_dict"]["backbone.blocks.0.mlp.fc1.weight"]
    moved = (trained - reference.blocks[0].mlp.fc1.weight).abs().max()
    assert 0 < moved < 0.1, "starts from the file's weights and takes small steps"


def test_pretrained_timm_file_with_another_head_keeps_the_fresh_one(make_cfg, tmp_path) -> None:
    file = save_safetensors(timm_vit_tiny(num_classes=21), tmp_path / "in21k.safetensors")
    backbone = build_backbone(make_cfg(*vit_tiny_overrides(f"model.pretrained={file}")).model)
    assert torch.count_nonzero(backbone.head.weight) == 0
    assert backbone.blocks[0].mlp.fc1.weight.abs().sum() > 0


def test_pretrained_timm_file_of_another_grid_gets_its_position_table_resized(tmp_path) -> None:
    reference = timm_vit_tiny(img_size=16)
    model = from_timm(timm_vit_tiny())  # 8x8 grid; the file's is 4x4
    load_pretrained(model, save_pth(reference, tmp_path / "small.pth"))
    assert model.pos_embed.pos_embedding.shape == (1, 1 + 8 * 8, 64)
    torch.testing.assert_close(model.cls_token, reference.cls_token)


def test_missing_timm_file_is_named(make_cfg, tmp_path) -> None:
    missing = tmp_path / "vit_base_patch16_224.safetensors"
    with pytest.raises(CheckpointError, match=rf"{missing} does not exist"):
        train(make_cfg(*vit_tiny_overrides(f"model.pretrained={missing}")))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_timm_file_is_reported(suffix, make_cfg, tmp_path) -> None:
    save = save_pth if suffix == ".pth" else save_safetensors
    file = save(timm_vit_tiny(), tmp_path / f"cut{suffix}")
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"cut\{suffix} is not a readable \{suffix} file"):
        build_backbone(make_cfg(*vit_tiny_overrides(f"model.pretrained={file}")).model)


def test_timm_file_of_another_architecture_names_keys_and_shapes(make_cfg, tmp_path) -> None:
    file = save_pth(timm_vit_tiny(embed_dim=32, depth=5), tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as error:
        build_backbone(make_cfg(*vit_tiny_overrides(f"model.pretrained={file}")).model)
    message = str(error.value)
    assert "other.pth does not fit the configured architecture" in message
    assert "config expects blocks.0.attn.qkv.weight (192, 64) but file has (96, 32)" in message
    assert "in the file but not in the model (12):\n    blocks.4." in message
    assert "from_timm" in message
