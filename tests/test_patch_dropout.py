"""PatchDropout: a random share of the patch tokens in training, the class token always, every token in eval."""

from __future__ import annotations

import pytest
import torch

from vitlab.models import VisionTransformer
from vitlab.models.patch_dropout import PatchDropout

TINY = dict(image_size=16, patch_size=4, num_classes=3, hidden_size=16, num_layers=2, num_heads=2)


def _vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**TINY, mlp_dim=32, **kwargs)


def _tokens(b: int = 4, n: int = 16, d: int = 8) -> torch.Tensor:
    # Token i of every image holds the value i, so what was kept can be read back.
    return torch.arange(1 + n, dtype=torch.float32).view(1, -1, 1).expand(b, -1, d).clone()


def test_training_keeps_the_class_token_first_and_a_share_of_the_patches_in_order():
    drop = PatchDropout(0.75, num_prefix_tokens=1).train()
    kept = drop(_tokens())[..., 0]
    assert kept.shape == (4, 1 + 4)  # int(16 * 0.25) patches
    assert (kept[:, 0] == 0).all(), "the class token is kept, first"
    patches = kept[:, 1:]
    assert (patches >= 1).all() and (patches.diff(dim=1) > 0).all(), "distinct, in grid order"
    assert len({tuple(row.tolist()) for row in patches}) > 1, "each image draws its own"


def test_the_draws_come_from_the_seeded_global_rng():
    drop = PatchDropout(0.5).train()
    torch.manual_seed(3)
    first = drop(_tokens())
    torch.manual_seed(3)
    assert torch.equal(drop(_tokens()), first)


def test_eval_sees_every_token_and_the_same_logits_as_without_patch_dropout():
    x = torch.randn(2, 3, 16, 16)
    plain, dropping = _vit().eval(), _vit(patch_dropout=0.5).eval()
    assert torch.equal(dropping(x), plain(x))
    tokens, _ = dropping.embed(x)
    assert tokens.shape[1] == 1 + 16


def test_a_training_step_runs_on_fewer_tokens_and_reaches_every_weight():
    model = _vit(patch_dropout=0.5, classifier="gap").train()
    tokens, _ = model.embed(torch.randn(2, 3, 16, 16))
    assert tokens.shape[1] == 8
    torch.nn.init.normal_(model.head.weight)  # the zero head would pass no gradient back
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pos_embed", ["conditional", "rope2d"])
def test_encodings_that_need_every_token_are_refused_by_name(pos_embed):
    with pytest.raises(ValueError, match=rf"patch_dropout=0.5 .*pos_embed='{pos_embed}'"):
        _vit(patch_dropout=0.5, pos_embed=pos_embed)
