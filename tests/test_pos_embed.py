"""`model.pos_embed`: every position encoding works, carries position, saves, and fails clearly."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
from einops import rearrange
from omegaconf import DictConfig

from tests import conftest
from vitlab.errors import CheckpointError, ConfigError
from vitlab.models import MlpMixer, ResNetV2, VisionTransformer, load_pretrained
from vitlab.models.checkpoints import to_official
from vitlab.models.layers import Attention
from vitlab.models.pos_embed import (
    AxialRotaryEmbedding,
    LearnedPositionEmbedding,
    PosEmbed,
    SinCos2dPositionEmbedding,
)
from vitlab.runs.build import build_backbone
from vitlab.training.optim import param_groups

KINDS = get_args(PosEmbed)
POSITIONAL = [kind for kind in KINDS if kind != "none"]
NOT_LEARNED = [kind for kind in KINDS if kind != "learned"]
CLASSIFIERS = ["token", "gap"]
FIXTURES = Path(__file__).parent / "fixtures"


def tiny_vit(pos_embed: str, seed: int = 0, **overrides) -> VisionTransformer:
    """The suite's tiny ViT (a 4x4 grid of 4x4 patches) with this position encoding, in eval mode."""
    torch.manual_seed(seed)
    return conftest.tiny_vit(pos_embed=pos_embed, **overrides).eval()


def images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def patch_tokens(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(x)[:, model.num_prefix_tokens :]


@pytest.mark.parametrize("classifier", CLASSIFIERS)
@pytest.mark.parametrize("patch_size", [4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_works_at_the_training_size_and_at_a_larger_eval_size(
    kind: str, patch_size: int, classifier: str
) -> None:
    model = tiny_vit(kind, patch_size=patch_size, classifier=classifier)
    with torch.no_grad():
        assert model(images(16)).shape == (2, 10)
        assert model(images(24)).shape == (2, 10)
        tokens = model.forward_features(images(24))
    assert tokens.shape == (2, model.num_prefix_tokens + (24 // patch_size) ** 2, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_hybrid_forward_works_at_a_larger_eval_size(kind: str) -> None:
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32,
        patch_size=1,
        num_classes=10,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        mlp_dim=64,
        stem=ResNetV2((1, 1), width_factor=0.5),
        pos_embed=kind,
    ).eval()
    with torch.no_grad():
        assert model(images(32)).shape == model(images(48)).shape == (2, 10)


@pytest.mark.parametrize("classifier", CLASSIFIERS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_few_optimizer_steps_lower_the_loss_and_reach_every_parameter(
    kind: str, classifier: str
) -> None:
    model = tiny_vit(kind, classifier=classifier).train()
    x, y = images(16, batch=8), torch.randint(10, (8,), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.any(), f"{name} gets no gradient"


def permute_patches(x: torch.Tensor, order: torch.Tensor, patch_size: int) -> torch.Tensor:
    side = x.shape[-1] // patch_size
    patches = rearrange(x, "b c (h p1) (w p2) -> b (h w) c p1 p2", p1=patch_size, p2=patch_size)
    return rearrange(patches[:, order], "b (h w) c p1 p2 -> b c (h p1) (w p2)", h=side, w=side)


@pytest.mark.parametrize("classifier", CLASSIFIERS)
@pytest.mark.parametrize("kind", POSITIONAL)
def test_position_encoding_makes_the_encoder_see_where_patches_are(
    kind: str, classifier: str
) -> None:
    """Shuffling the patches does not just shuffle the encoded tokens: position matters."""
    model, x = tiny_vit(kind, classifier=classifier), images(16)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    shuffled = patch_tokens(model, permute_patches(x, order, 4))
    assert not torch.allclose(shuffled, patch_tokens(model, x)[:, order], atol=1e-3)


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_without_position_encoding_shuffling_patches_only_shuffles_the_tokens(
    classifier: str,
) -> None:
    model, x = tiny_vit("none", classifier=classifier), images(16)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    shuffled = patch_tokens(model, permute_patches(x, order, 4))
    torch.testing.assert_close(shuffled, patch_tokens(model, x)[:, order], atol=1e-5, rtol=0)


# Not rope2d with gap: identical patches have identical values, and with no class token
# every attention output is a weighted mean of that one value, whatever the weights.
@pytest.mark.parametrize(
    ("kind", "classifier"),
    [(k, c) for k in POSITIONAL for c in CLASSIFIERS if (k, c) != ("rope2d", "gap")],
)
def test_identical_patches_are_encoded_differently_at_different_positions(
    kind: str, classifier: str
) -> None:
    tokens = patch_tokens(tiny_vit(kind, classifier=classifier), torch.full((1, 3, 16, 16), 0.5))
    assert (tokens[:, 1:] - tokens[:, :1]).abs().amax() > 1e-3


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_without_position_encoding_identical_patches_are_encoded_identically(
    classifier: str,
) -> None:
    tokens = patch_tokens(tiny_vit("none", classifier=classifier), torch.full((1, 3, 16, 16), 0.5))
    torch.testing.assert_close(tokens, tokens[:, :1].expand_as(tokens), atol=1e-6, rtol=0)


def randomized(model: VisionTransformer) -> VisionTransformer:
    """Every parameter random (the head too), so that a parameter lost in saving shows."""
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.1)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trips_through_a_file_with_identical_outputs(
    kind: str, tmp_path: Path
) -> None:
    saved = randomized(tiny_vit(kind, seed=0))
    torch.save(saved.state_dict(), tmp_path / "weights.pt")
    loaded = tiny_vit(kind, seed=1)
    loaded.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    with torch.no_grad():
        for size in (16, 24):
            torch.testing.assert_close(loaded(images(size)), saved(images(size)), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["sincos2d", "none", "rope2d"])
def test_encodings_without_parameters_add_nothing_to_the_state_dict(kind: str) -> None:
    learned_keys = set(tiny_vit("learned").state_dict()) - {"pos_embed.pos_embedding"}
    assert set(tiny_vit(kind).state_dict()) == learned_keys


def test_sincos2d_matches_big_visions_posemb_sincos_2d_on_a_2x3_grid() -> None:
    """D = 8: omega_i = 1 / 10000^(i / (8/4 - 1)) = [1, 1e-4]; rows [sin x, cos x, sin y, cos y]."""
    omega = [1.0, 1e-4]
    expected = [[0.0] * 8]  # the class token
    for y in range(2):
        for x in range(3):
            expected.append(
                [math.sin(x * w) for w in omega]
                + [math.cos(x * w) for w in omega]
                + [math.sin(y * w) for w in omega]
                + [math.cos(y * w) for w in omega]
            )
    encoding = SinCos2dPositionEmbedding(num_prefix_tokens=1, hidden_size=8)
    table = encoding(torch.zeros(1, 7, 8), grid=(2, 3))
    torch.testing.assert_close(table, torch.tensor([expected]), atol=1e-6, rtol=0)


def test_sincos2d_needs_hidden_size_divisible_by_4() -> None:
    with pytest.raises(ValueError, match=r"pos_embed='sincos2d'.*hidden_size=30"):
        tiny_vit("sincos2d", hidden_size=30)


def test_rope2d_needs_head_dim_divisible_by_4() -> None:
    with pytest.raises(ValueError, match=r"pos_embed='rope2d'.*head_dim 6"):
        tiny_vit("rope2d", hidden_size=24, num_heads=4)


def rotated(grid: tuple[int, int], t: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """One vector `t` (head_dim,) at every token of `grid`, rotated: (prefix + h*w, head_dim)."""
    rope = AxialRotaryEmbedding(num_prefix_tokens, hidden_size=t.shape[0], num_heads=1)
    n = num_prefix_tokens + grid[0] * grid[1]
    return rope.rotation(grid, t.device)(t.expand(1, 1, n, -1))[0, 0]


def test_rope2d_query_key_product_depends_only_on_the_offset() -> None:
    generator = torch.Generator().manual_seed(0)
    q = rotated((6, 6), torch.randn(8, generator=generator))
    k = rotated((6, 6), torch.randn(8, generator=generator))

    def score(query: tuple[int, int], key: tuple[int, int]) -> float:
        return float(q[query[0] * 6 + query[1]] @ k[key[0] * 6 + key[1]])

    for (qy, qx), (ky, kx), (dy, dx) in [((1, 2), (3, 1), (1, 2)), ((0, 0), (4, 5), (1, 0))]:
        shifted = score((qy + dy, qx + dx), (ky + dy, kx + dx))
        assert score((qy, qx), (ky, kx)) == pytest.approx(shifted, abs=1e-5)
    assert score((1, 2), (3, 1)) != pytest.approx(score((1, 2), (3, 2)), abs=1e-3)  # other x offset
    assert score((1, 2), (3, 1)) != pytest.approx(score((1, 2), (4, 1)), abs=1e-3)  # other y offset


def test_rope2d_turns_the_first_half_of_a_head_with_x_and_the_second_with_y() -> None:
    t = rotated((2, 2), torch.randn(16, generator=torch.Generator().manual_seed(0)))
    origin, right, below = t[0], t[1], t[2]  # (0, 0), (0, 1), (1, 0)
    assert torch.equal(right[8:], origin[8:]) and not torch.allclose(right[:8], origin[:8])
    assert torch.equal(below[:8], origin[:8]) and not torch.allclose(below[8:], origin[8:])


def test_rope2d_leaves_the_class_token_unrotated() -> None:
    t = torch.randn(8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rotated((3, 3), t, num_prefix_tokens=1)[0], t, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_attention_maps_give_one_row_stochastic_map_per_layer(kind: str) -> None:
    model = tiny_vit(kind)
    with torch.no_grad():
        maps = model.attention_maps(images(24))
    assert [m.shape for m in maps] == [(2, 2, 37, 37)] * 2
    torch.testing.assert_close(maps[1].sum(dim=-1), torch.ones(2, 2, 37))


def test_attention_weights_are_the_ones_sdpa_applies_with_the_rope_rotation() -> None:
    """With identity value and output projections, attention(x) = weights @ x per head."""
    torch.manual_seed(0)
    attention = Attention(hidden_size=16, num_heads=2)
    with torch.no_grad():
        attention.qkv.weight[32:] = torch.eye(16)
        attention.qkv.bias.zero_()
        attention.out.weight.copy_(torch.eye(16))
        attention.out.bias.zero_()
        rotate = AxialRotaryEmbedding(1, hidden_size=16, num_heads=2).rotation(
            (2, 3), torch.device("cpu")
        )
        x = torch.randn(2, 7, 16)
        weights = attention.attention_weights(x, rotate)
        by_hand = weights @ rearrange(x, "b n (h d) -> b h n d", h=2)
        torch.testing.assert_close(
            attention(x, rotate), rearrange(by_hand, "b h n d -> b n (h d)"), atol=1e-5, rtol=0
        )


def test_weight_decay_skips_the_learned_table_and_the_peg_bias_but_not_the_peg_kernel() -> None:
    assert "pos_embed.pos_embedding" in tiny_vit("learned").no_weight_decay()
    model = tiny_vit("conditional")
    decay, _ = param_groups(model, weight_decay=0.1)
    decayed = {id(p) for p in decay["params"]}
    assert id(model.pos_embed.proj.weight) in decayed
    assert id(model.pos_embed.proj.bias) not in decayed


def test_unknown_pos_embed_is_refused_with_the_valid_choices() -> None:
    with pytest.raises(
        ValueError,
        match=r"pos_embed='alibi' is not one of "
        r"\['learned', 'sincos2d', 'none', 'conditional', 'rope2d'\]",
    ):
        tiny_vit("alibi")


def test_mixer_refuses_a_position_encoding() -> None:
    with pytest.raises(ValueError, match=r"MlpMixer has no position encoding.*model\.pos_embed"):
        MlpMixer(16, 4, 10, 32, 2, 24, 64, pos_embed="sincos2d")


def official_file() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "vit_tiny_token.npz") as npz:
        return {n: npz[n] for n in npz.files if not n.startswith("fixture/")}


@pytest.mark.parametrize("kind", NOT_LEARNED)
def test_official_file_does_not_load_into_another_position_encoding(kind: str) -> None:
    model = tiny_vit(kind)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(
        CheckpointError,
        match=rf"learned position embedding.*pos_embed='{kind}'.*`model\.pos_embed=learned`",
    ):
        load_pretrained(model, official_file())
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_official_file_loads_into_a_learned_model() -> None:
    model = tiny_vit("learned")
    load_pretrained(model, official_file())
    assert isinstance(model.pos_embed, LearnedPositionEmbedding)


@pytest.mark.parametrize("kind", NOT_LEARNED)
def test_exporting_another_position_encoding_to_the_official_layout_is_refused(kind: str) -> None:
    with pytest.raises(CheckpointError, match=rf"pos_embed='{kind}'.*to load or export"):
        to_official(tiny_vit(kind))


def test_vit_config_takes_pos_embed_from_the_command_line(
    make_cfg: Callable[..., DictConfig],
) -> None:
    backbone = build_backbone(make_cfg("model=vit_tiny", "model.pos_embed=rope2d").model)
    assert isinstance(backbone.pos_embed, AxialRotaryEmbedding)


def test_mixer_config_with_pos_embed_fails_naming_the_model_key(
    make_cfg: Callable[..., DictConfig],
) -> None:
    cfg = make_cfg("model=mixer_s16", "model.pos_embed=sincos2d")
    with pytest.raises(ConfigError, match=r"(?s)`model`.*MlpMixer has no position encoding"):
        build_backbone(cfg.model)
