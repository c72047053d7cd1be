"""The model internals the notebooks plot, and the rollout / similarity computed from them."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_vit
from vitlab.models import GMlp, MlpMixer
from vitlab.models.analysis import attention_rollout, position_similarity


def tiny_mixer() -> MlpMixer:
    return MlpMixer(
        image_size=16, patch_size=4, num_classes=10, hidden_dim=32, num_blocks=2,
        tokens_mlp_dim=8, channels_mlp_dim=64,
    )  # fmt: skip


def test_position_embeddings_lay_the_learned_table_out_on_the_patch_grid():
    model = tiny_vit(image_size=24)  # a 6x6 grid
    table = model.pos_embed.pos_embedding.detach()[0]
    grid = model.position_embeddings()
    assert grid.shape == (6, 6, 32)
    assert torch.equal(grid[2, 5], table[1 + 2 * 6 + 5]), "row-major, after the class token"


def test_position_embeddings_of_sincos2d_are_the_fixed_table():
    model = tiny_vit(pos_embed="sincos2d", classifier="gap")
    table = model.pos_embed.table((4, 4), torch.device("cpu"))
    assert torch.equal(model.position_embeddings()[1, 3], table[1 * 4 + 3])


@pytest.mark.parametrize("kind", ["none", "conditional", "rope2d"])
def test_position_embeddings_refuse_encodings_that_add_no_vector(kind):
    with pytest.raises(ValueError, match=rf"pos_embed='{kind}' adds no vector"):
        tiny_vit(pos_embed=kind).position_embeddings()


def test_learned_table_leaves_the_forward_pass_and_state_dict_unchanged():
    model = tiny_vit().eval()
    images = torch.randn(2, 3, 16, 16)
    tokens = model.patch_embed(images)[0]
    tokens = torch.cat([model.cls_token.expand(2, -1, -1), tokens], dim=1)
    expected = tokens + model.pos_embed.pos_embedding
    assert torch.equal(model.pos_embed(tokens, (4, 4)), expected)
    assert "pos_embed.pos_embedding" in model.state_dict()


def test_token_mixing_weights_are_each_hidden_units_weights_on_the_patch_grid():
    model = tiny_mixer()
    weights = model.token_mixing_weights(block=1)
    fc1 = model.blocks[1].token_mixing.fc1.weight
    assert weights.shape == (8, 4, 4)
    assert torch.equal(weights[5, 2, 1], fc1[5, 2 * 4 + 1].detach())
    assert not weights.requires_grad


def test_spatial_gating_weights_are_each_tokens_weights_on_the_patch_grid():
    model = GMlp(
        image_size=16, patch_size=4, num_classes=10, hidden_dim=16, num_blocks=2, ffn_dim=32
    )
    weights = model.spatial_gating_weights(block=1)
    proj = model.blocks[1].sgu.spatial_proj.weight
    assert weights.shape == (16, 4, 4)
    assert torch.equal(weights[5, 2, 1], proj[5, 2 * 4 + 1].detach())
    assert not weights.requires_grad


def test_rollout_of_uniform_attention_spreads_evenly_over_the_patches():
    """Each layer is (I + U) / 2 with U uniform, so 4 layers give I / 16 + (15 / 16) U."""
    n = 1 + 4 * 4
    maps = [torch.full((2, 3, n, n), 1.0 / n) for _ in range(4)]
    rollout = attention_rollout(maps, num_prefix_tokens=1, grid=(4, 4))
    assert rollout.shape == (2, 4, 4)
    assert torch.allclose(rollout, torch.full_like(rollout, 15 / 16 / n))


def test_rollout_follows_attention_through_the_layers():
    """Layer 1: patch 3 looks at patch 7; layer 2: the class token looks at patch 3."""
    n = 1 + 9
    first, second = torch.eye(n).repeat(1, 1, 1, 1), torch.eye(n).repeat(1, 1, 1, 1)
    first[0, 0, 1 + 3] = 0.0
    first[0, 0, 1 + 3, 1 + 7] = 1.0
    second[0, 0, 0] = 0.0
    second[0, 0, 0, 1 + 3] = 1.0
    rollout = attention_rollout([first, second], num_prefix_tokens=1, grid=(3, 3))
    # Residual halves: cls keeps 1/2 and takes 1/2 from patch 3, which took half of that from 7.
    assert rollout[0, 1, 0] == pytest.approx(0.25)  # patch 3 at row 1, column 0
    assert rollout[0, 2, 1] == pytest.approx(0.25)  # patch 7 at row 2, column 1
    assert rollout.sum() == pytest.approx(0.5), "the other half stays on the class token"


def test_rollout_of_a_trained_model_is_a_distribution_over_its_tokens():
    model = tiny_vit().eval()
    with torch.no_grad():
        maps = model.attention_maps(torch.randn(2, 3, 16, 16))
    rollout = attention_rollout(maps, model.num_prefix_tokens, model.grid)
    assert rollout.shape == (2, 4, 4)
    assert ((rollout > 0) & (rollout < 1)).all()


def test_position_similarity_is_cosine_similarity_between_patches():
    embeddings = torch.randn(3, 5, 16)
    similarity = position_similarity(embeddings)
    assert similarity.shape == (3, 5, 3, 5)
    assert similarity[1, 2, 1, 2] == pytest.approx(1.0)
    expected = torch.cosine_similarity(embeddings[0, 4], embeddings[2, 1], dim=0)
    assert similarity[0, 4, 2, 1] == pytest.approx(expected.item(), abs=1e-6)
    assert similarity[2, 1, 0, 4] == pytest.approx(expected.item(), abs=1e-6)
