"""Reading and writing the official `.npz` layout: round trips, fine-tuning rules, errors, timm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from einops import rearrange
from timm.models.vision_transformer import _load_weights as timm_load_npz
from torch import nn

from tests.conftest import tiny_vit
from vitlab.errors import CheckpointError
from vitlab.models import MlpMixer, ResNetV2, VisionTransformer, from_official_npz, load_pretrained
from vitlab.models.checkpoints import save_official_npz, to_official

FIXTURES = Path(__file__).parent / "fixtures"


def tiny_hybrid() -> VisionTransformer:
    return tiny_vit(image_size=32, patch_size=1, stem=ResNetV2((1, 1), width_factor=0.5))


def tiny_mixer(**overrides) -> MlpMixer:
    kwargs = dict(
        image_size=16,
        patch_size=4,
        num_classes=10,
        hidden_dim=32,
        num_blocks=2,
        tokens_mlp_dim=24,
        channels_mlp_dim=64,
    )
    return MlpMixer(**{**kwargs, **overrides})


def randomized(model: nn.Module) -> nn.Module:
    """Every parameter random, so that a zero head or a dropped tensor shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.1)
    return model.eval()


def fixture_params(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as npz:
        return {n: npz[n] for n in npz.files if not n.startswith("fixture/")}


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], rtol=0, atol=0, msg=name)


VIT_BLOCK_KEYS = [
    "norm1.weight", "norm1.bias",
    "attn.qkv.weight", "attn.qkv.bias", "attn.out.weight", "attn.out.bias",
    "norm2.weight", "norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
]  # fmt: skip
MIXER_BLOCK_KEYS = [
    "norm1.weight", "norm1.bias",
    "token_mixing.fc1.weight", "token_mixing.fc1.bias",
    "token_mixing.fc2.weight", "token_mixing.fc2.bias",
    "norm2.weight", "norm2.bias",
    "channel_mixing.fc1.weight", "channel_mixing.fc1.bias",
    "channel_mixing.fc2.weight", "channel_mixing.fc2.bias",
]  # fmt: skip
RESNET_UNIT_KEYS = [
    "conv_proj.weight", "gn_proj.weight", "gn_proj.bias",
    "conv1.weight", "gn1.weight", "gn1.bias",
    "conv2.weight", "gn2.weight", "gn2.bias",
    "conv3.weight", "gn3.weight", "gn3.bias",
]  # fmt: skip


def two_blocks(keys: list[str], prefix: str = "blocks") -> list[str]:
    return [f"{prefix}.{i}.{key}" for i in range(2) for key in keys]


STATE_DICT_KEYS = {
    "vit": [
        "cls_token",
        "patch_embed.proj.weight", "patch_embed.proj.bias",
        "pos_embed.pos_embedding",
        *two_blocks(VIT_BLOCK_KEYS),
        "norm.weight", "norm.bias",
        "pre_logits.0.weight", "pre_logits.0.bias",
        "head.weight", "head.bias",
    ],
    "mixer": [
        "stem.proj.weight", "stem.proj.bias",
        *two_blocks(MIXER_BLOCK_KEYS),
        "pre_head_layer_norm.weight", "pre_head_layer_norm.bias",
        "head.weight", "head.bias",
    ],
    "hybrid": [
        "cls_token",
        "stem.conv_root.weight", "stem.gn_root.weight", "stem.gn_root.bias",
        *[f"stem.stages.{s}.units.0.{key}" for s in range(2) for key in RESNET_UNIT_KEYS],
        "patch_embed.proj.weight", "patch_embed.proj.bias",
        "pos_embed.pos_embedding",
        *two_blocks(VIT_BLOCK_KEYS),
        "norm.weight", "norm.bias",
        "head.weight", "head.bias",
    ],
}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("vit", lambda: tiny_vit(representation_size=24)),
        ("mixer", tiny_mixer),
        ("hybrid", tiny_hybrid),
    ],
)
def test_state_dict_keys_are_the_ones_saved_checkpoints_hold(name, make) -> None:
    """Every checkpoint written so far, and the official layout table, name these keys."""
    assert list(make().state_dict()) == STATE_DICT_KEYS[name]


@pytest.mark.parametrize(
    "make",
    [
        tiny_vit,
        lambda: tiny_vit(classifier="gap", representation_size=24),
        tiny_hybrid,
        lambda: tiny_vit(image_size=32, patch_size=2, stem=ResNetV2((), width_factor=0.5)),
        tiny_mixer,
    ],
    ids=["vit_token", "vit_gap_rep", "hybrid", "hybrid_root_only", "mixer"],
)
def test_exported_model_rebuilds_exactly_from_the_official_layout(make) -> None:
    model = randomized(make())
    assert_same_state(from_official_npz(to_official(model)), model)


def test_export_uses_the_official_names_and_layouts() -> None:
    params = fixture_params("hybrid_tiny")
    exported = to_official(from_official_npz(params))
    assert exported.keys() == params.keys()
    for name, array in params.items():
        np.testing.assert_array_equal(
            exported[name], array.reshape(exported[name].shape), err_msg=name
        )


def test_opt_target_prefix_is_accepted() -> None:
    params = fixture_params("vit_tiny_token")
    prefixed = {f"opt/target/{n}": a for n, a in params.items()} | {"opt/state/step": np.array(3)}
    assert_same_state(from_official_npz(prefixed), from_official_npz(params))


def test_group_norm_params_load_both_as_1_1_1_c_and_as_c() -> None:
    params = fixture_params("hybrid_tiny")
    assert params["gn_root/scale"].shape == (1, 1, 1, 32)
    flat = {
        n: (rearrange(a, "1 1 1 c -> c") if a.ndim == 4 and "/gn" in f"/{n}" else a)
        for n, a in params.items()
    }
    assert flat["gn_root/scale"].shape == (32,)
    assert_same_state(from_official_npz(flat), from_official_npz(params))


def test_other_num_classes_gives_a_fresh_zero_head_and_keeps_the_rest() -> None:
    params = fixture_params("vit_tiny_token")
    model = from_official_npz(params, num_classes=5)
    assert model.head.weight.shape == (5, 32)
    assert not model.head.weight.any() and not model.head.bias.any()
    torch.testing.assert_close(
        model.norm.weight, torch.from_numpy(params["Transformer/encoder_norm/scale"])
    )


def test_load_pretrained_keeps_the_models_head_when_its_size_differs() -> None:
    model = tiny_vit(num_classes=3)
    load_pretrained(model, fixture_params("vit_tiny_token"))
    assert not model.head.weight.any()


def test_file_pre_logits_are_dropped_with_its_head_when_the_model_has_none() -> None:
    params = fixture_params("vit_tiny_gap_rep")
    model = tiny_vit(classifier="gap")
    load_pretrained(model, params)
    assert not model.head.weight.any()
    torch.testing.assert_close(
        model.norm.weight, torch.from_numpy(params["Transformer/encoder_norm/scale"])
    )


def test_load_pretrained_resizes_the_position_embedding_to_the_models_grid() -> None:
    model = tiny_vit(image_size=24)
    load_pretrained(model, fixture_params("vit_tiny_token"))
    assert model.pos_embed.pos_embedding.shape == (1, 1 + 6 * 6, 32)


def test_mixer_cannot_change_image_size() -> None:
    with pytest.raises(CheckpointError, match=r"image_size=32.*Use 16"):
        from_official_npz(fixture_params("mixer_tiny"), image_size=32)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "ViT-B_16.npz"
    with pytest.raises(CheckpointError, match=r"ViT-B_16\.npz does not exist"):
        load_pretrained(tiny_vit(), path)


def test_file_that_is_not_an_npz_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "notes.npz"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.npz is not a readable \.npz archive"):
        from_official_npz(path)


def test_single_npy_array_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "array.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(CheckpointError, match=r"array\.npy holds a single \.npy array"):
        from_official_npz(path)


def test_truncated_npz_is_reported(tmp_path: Path) -> None:
    path = save_official_npz(tiny_vit(), tmp_path / "ViT-tiny.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(
        CheckpointError, match=r"ViT-tiny\.npz is not a readable \.npz archive.*truncated"
    ):
        load_pretrained(tiny_vit(), path)


def test_wrong_width_lists_config_and_file_shapes(tmp_path: Path) -> None:
    path = save_official_npz(tiny_vit(), tmp_path / "small.npz")
    model = tiny_vit(hidden_size=64, num_heads=4)
    with pytest.raises(CheckpointError) as error:
        load_pretrained(model, path)
    message = str(error.value)
    assert "small.npz does not fit the configured architecture" in message
    assert (
        "config expects Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel "
        "(64, 4, 16) but file has (32, 2, 16)"
    ) in message


def test_extra_blocks_in_the_file_are_listed_as_unexpected() -> None:
    deeper = to_official(tiny_vit(num_layers=3))
    with pytest.raises(
        CheckpointError, match=r"in the file but not in the model \(16\):\n.*encoderblock_2/"
    ):
        load_pretrained(tiny_vit(), deeper)


def test_blocks_absent_from_the_file_are_listed_as_missing() -> None:
    shallower = to_official(tiny_vit(num_layers=1))
    with pytest.raises(CheckpointError, match=r"missing from the file \(16\):\n.*encoderblock_1/"):
        load_pretrained(tiny_vit(), shallower)


def test_failed_load_leaves_the_model_untouched() -> None:
    model = randomized(tiny_vit())
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_pretrained(model, to_official(tiny_vit(mlp_dim=32)))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_plain_vit_file_does_not_load_into_a_hybrid() -> None:
    with pytest.raises(CheckpointError, match=r"missing from the file.*\n.*conv_root/kernel"):
        load_pretrained(tiny_hybrid(), fixture_params("vit_tiny_token"))


def test_mixer_patch_size_that_does_not_divide_the_image_is_rejected() -> None:
    with pytest.raises(
        ValueError,
        match=r"patch_size=5 does not divide image_size=16; valid patch sizes: \[1, 2, 4, 8, 16\]",
    ):
        tiny_mixer(patch_size=5)


def timm_vit_ti16_and_file(tmp_path: Path) -> tuple[nn.Module, Path]:
    ours = randomized(
        VisionTransformer(
            image_size=224,
            patch_size=16,
            num_classes=1000,
            hidden_size=192,
            num_layers=12,
            num_heads=3,
            mlp_dim=768,
        )
    )
    path = save_official_npz(ours, tmp_path / "Ti_16.npz")
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    timm_load_npz(reference, str(path))
    return reference.eval(), path


@pytest.fixture(scope="module")
def timm_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, torch.Tensor]:
    reference, path = timm_vit_ti16_and_file(tmp_path_factory.mktemp("timm"))
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return reference, path, images


def test_exact_gelu_vit_ti16_matches_timm_on_the_same_npz(timm_case) -> None:
    reference, path, images = timm_case
    ours = VisionTransformer(
        image_size=224,
        patch_size=16,
        num_classes=1000,
        hidden_size=192,
        num_layers=12,
        num_heads=3,
        mlp_dim=768,
        gelu_approximate="none",
    )
    load_pretrained(ours, path)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(images), reference(images), atol=1e-4, rtol=0)


def test_default_tanh_gelu_differs_slightly_from_timms_exact_gelu(timm_case) -> None:
    reference, path, images = timm_case
    with torch.no_grad():
        difference = (from_official_npz(path)(images) - reference(images)).abs().max().item()
    assert 1e-6 < difference < 1e-1
