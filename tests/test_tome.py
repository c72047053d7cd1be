"""Token merging (`vitlab.models.tome`): ToMe as the authors' code computes it, and off at r = 0.

`tests/fixtures/tome_public.npz` holds logits of a timm ViT patched with
facebookresearch/ToMe (`tests/fixtures/README.md`); the other tests pin one
behaviour each on tiny models: token counts, the protected class token,
proportional attention, size-weighted merging and pooling, refusals, training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import vitlab.models.tome as tome
from tests.conftest import tiny_vit
from tests.test_checkpoints import fixture_params
from tests.test_scale_knobs import images, randomized, tiny_hybrid
from vitlab.models import VisionTransformer, from_official_npz, from_timm
from vitlab.models.layers import Attention

FIXTURES = Path(__file__).parent / "fixtures"


def tokens_entering_the_mlps(model: VisionTransformer, x: torch.Tensor) -> list[int]:
    """How many tokens each block's MLP sees (after that block's merge), over every token."""
    counts: list[int] = []
    hooks = [
        block.mlp.register_forward_pre_hook(lambda _, args: counts.append(args[0].shape[1]))
        for block in model.blocks
    ]
    with torch.no_grad():
        model.forward_features(x)
    for hook in hooks:
        hook.remove()
    return counts


@pytest.fixture(scope="module")
def reference():
    """The fixture's timm ViT loaded into ours through `from_timm`, its input and its logits."""
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    arrays = np.load(FIXTURES / "tome_public.npz")
    timm_vit = vision_transformer.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=48, depth=3, num_heads=2, mlp_ratio=4.0, num_classes=7
    )
    timm_vit.load_state_dict(
        {
            key.removeprefix("state/"): torch.from_numpy(arrays[key])
            for key in arrays.files
            if key.startswith("state/")
        }
    )
    return from_timm(timm_vit), torch.from_numpy(arrays["input"]), arrays


@pytest.mark.parametrize("r", [0, 8])
def test_logits_match_the_authors_tome_on_timm(reference, r) -> None:
    model, x, arrays = reference
    model.token_merging = r
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(
        logits, torch.from_numpy(arrays[f"logits_tome_r{r}"]), rtol=0, atol=1e-5
    )


def test_token_counts_fall_by_r_in_every_block(reference) -> None:
    model, x, _ = reference
    model.token_merging = 8
    assert tokens_entering_the_mlps(model, x) == [57, 49, 41]  # from 1 + 8 * 8
    assert tome.token_counts(65, 8, depth=3, class_token=True) == [65, 57, 49, 41]


def test_r_is_capped_at_half_the_mergeable_tokens() -> None:
    model = tiny_vit(image_size=32, num_layers=3, token_merging=100).eval()  # 1 + 64 tokens
    assert tokens_entering_the_mlps(model, images(model)) == [33, 17, 9]
    assert tome.token_counts(65, 100, depth=3, class_token=True) == [65, 33, 17, 9]


def test_r0_runs_no_merging_code_and_gives_the_plain_logits(monkeypatch) -> None:
    model = randomized(tiny_vit()).eval()
    x = images(model)
    with torch.no_grad():
        plain = model(x)
        model.token_merging = 4
        merged = model(x)
        model.token_merging = 0

        def no_merging(*args, **kwargs):
            raise AssertionError("ToMe ran at token_merging=0")

        monkeypatch.setattr(tome, "merging_block", no_merging)
        again = model(x)
    assert not torch.allclose(merged, plain), "r = 4 merges"
    assert torch.equal(again, plain)


def test_the_class_token_is_never_merged_and_stays_first() -> None:
    torch.manual_seed(0)
    metric = torch.randn(2, 9, 4)
    metric[:, 1] = metric[:, 0]  # the class token's best match is as good as a match can be
    matching = tome.bipartite_soft_matching(metric, r=4, class_token=True)
    assert matching is not None
    assert (matching.merged != 0).all()
    assert (matching.unmerged[:, 0] == 0).all()


def test_a_merging_blocks_class_token_is_the_plain_blocks() -> None:
    """The first block (sizes all 1) computes the class token as without merging, at any r."""
    model = randomized(tiny_vit()).eval()
    x, _ = model.embed(images(model))
    block = model.blocks[0]
    with torch.no_grad():
        merged, merging = block(x, merging=tome.TokenMerging(r=8, class_token=True))
        plain = block(x)
    assert merged.shape[1] == x.shape[1] - 8
    torch.testing.assert_close(merged[:, 0], plain[:, 0], rtol=1e-6, atol=1e-6)
    assert (merging.size[:, 0] == 1).all()
    assert (merging.size.sum(dim=1) == x.shape[1]).all(), "sizes count the input tokens"


def test_proportional_attention_makes_a_token_of_size_k_attend_as_k_copies() -> None:
    torch.manual_seed(0)
    attn = randomized(Attention(hidden_size=16, num_heads=2)).eval()
    x = torch.randn(1, 4, 16)
    k = 3
    copies = torch.cat([x, x[:, 2:3].expand(1, k - 1, 16)], dim=1)  # token 2, k times
    size = torch.tensor([1.0, 1.0, k, 1.0]).reshape(1, 4, 1)
    with torch.no_grad():
        with_copies, _ = tome.attention_with_keys(attn, copies, None, None)
        with_sizes, _ = tome.attention_with_keys(attn, x, None, tome.proportional_attention(size))
    torch.testing.assert_close(with_sizes, with_copies[:, :4], rtol=1e-5, atol=1e-6)


def test_merged_tokens_are_averaged_by_size() -> None:
    x = torch.tensor([[[0.0], [10.0], [4.0], [20.0]]])  # A = tokens 0 and 2, B = 1 and 3
    size = torch.tensor([[[1.0], [1.0], [3.0], [1.0]]])
    matching = tome.Matching(
        unmerged=torch.tensor([[0]]), merged=torch.tensor([[1]]), destination=torch.tensor([[0]])
    )
    merged, merged_size = tome.merge_weighted_average(matching, x, size)
    assert merged.flatten().tolist() == [0.0, (3 * 4.0 + 10.0) / 4, 20.0]
    assert merged_size.flatten().tolist() == [1.0, 4.0, 1.0]


def test_expanded_tokens_average_to_the_size_weighted_mean() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5)
    size = torch.tensor([[1.0, 2.0, 3.0], [4.0, 1.0, 1.0]]).unsqueeze(-1)
    expanded = tome.expand_by_size(x, size, tokens=6)
    assert expanded.shape == (2, 6, 5)
    torch.testing.assert_close(expanded.mean(dim=1), (x * size).sum(dim=1) / 6)


def test_a_gap_model_merges_and_pools_every_input_token() -> None:
    model = randomized(tiny_vit(classifier="gap", token_merging=3)).eval()
    x = images(model)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert features.shape[1] == model.grid[0] * model.grid[1]
    assert tokens_entering_the_mlps(model, x) == [13, 10]
    torch.testing.assert_close(logits, model.forward_head(features))


@pytest.mark.parametrize("pos_embed", ["rope2d", "conditional"])
def test_encodings_that_need_every_token_are_refused(pos_embed) -> None:
    with pytest.raises(
        ValueError, match=r"pos_embed=.*refused: conditional, rope2d.*learned, sincos2d or none"
    ):
        tiny_vit(pos_embed=pos_embed, token_merging=2)
    model = tiny_vit(pos_embed=pos_embed)
    with pytest.raises(ValueError, match=f"token_merging=2.*pos_embed='{pos_embed}'"):
        model.token_merging = 2
    assert model.token_merging == 0


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_the_setter_refuses_what_is_not_a_non_negative_integer(value) -> None:
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"token_merging=.*non-negative integer"):
        model.token_merging = value
    assert model.token_merging == 0


def test_training_backpropagates_through_the_merge_with_checkpointing_too() -> None:
    grads = []
    for checkpointing in (False, True):
        model = randomized(tiny_vit(token_merging=3, grad_checkpointing=checkpointing)).train()
        model(images(model)).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain)


def test_a_hybrid_merges_the_stems_tokens() -> None:
    model = randomized(tiny_hybrid(token_merging=4)).eval()  # 1 + 4x4 cells of the stem's map
    x = images(model)
    assert tokens_entering_the_mlps(model, x) == [13, 9]
    with torch.no_grad():
        assert model(x).isfinite().all()


def test_a_pinned_math_kernel_takes_the_proportional_attention() -> None:
    auto = randomized(tiny_vit(num_layers=3, token_merging=4)).eval()
    math_kernel = tiny_vit(num_layers=3, token_merging=4, attention_backend="math").eval()
    math_kernel.load_state_dict(auto.state_dict())
    x = images(auto)
    with torch.no_grad():
        torch.testing.assert_close(math_kernel(x), auto(x), rtol=1e-5, atol=1e-5)


def test_a_model_from_an_official_npz_merges_off_the_shelf() -> None:
    model = from_official_npz(fixture_params("vit_tiny_token"))
    x = images(model)
    with torch.no_grad():
        plain = model(x)
        model.token_merging = 4
        merged = model(x)
    assert tokens_entering_the_mlps(model, x) == [13, 9]
    assert merged.isfinite().all() and not torch.allclose(merged, plain)
