"""FlexiViT: PI-resize and the flexi table resize against big_vision, any patch size on the fly,
the per-step draw in training, and checkpoints loaded at another patch size.

The references (`tests/fixtures/flexi_*.npz`, see the README there) are big_vision's own
functions run with TensorFlow and JAX; their kernels are HWIO, ours (out, in, p, q).
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import tiny_vit
from vitlab.models import (
    ResNetV2,
    from_official_npz,
    from_timm,
    resample_flexi_pos_embed,
    resample_patch_embed,
)
from vitlab.models.checkpoints import to_official
from vitlab.models.flexi import draw_patch_size, state_dict_at_patch_size
from vitlab.runs.build import build_classifier, instantiate
from vitlab.runs.tasks import evaluate, train
from vitlab.training.classifier import ImageClassifier

FIXTURES = Path(__file__).parent / "fixtures"
TOLERANCE = 1e-5


def _fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name) as npz:
        return {key: npz[key] for key in npz.files}


def _hwio_to_ours(kernel: np.ndarray) -> torch.Tensor:
    return rearrange(torch.from_numpy(kernel), "p q i o -> o i p q")


def _grid(name: str) -> tuple[int, int]:
    """`posemb_7x7` -> (7, 7)."""
    h, w = name.rsplit("_", 1)[1].split("x")
    return int(h), int(w)


# (file, source key, resized key): every resize of the two fixtures.
KERNELS = [
    ("flexi_public.npz", "kernel_8", "kernel_4"),
    ("flexi_public.npz", "kernel_8", "kernel_16"),
    *(
        ("flexi_more.npz", key.split("_to_")[0], key)
        for key in _fixture("flexi_more.npz")
        if key.startswith("kernel_") and "_to_" in key
    ),
]
TABLES = [
    ("flexi_public.npz", "posemb_7x7", "posemb_3x3"),
    ("flexi_public.npz", "posemb_7x7", "posemb_14x14"),
    *(
        ("flexi_more.npz", key.split("_to_")[0], key)
        for key in _fixture("flexi_more.npz")
        if key.startswith("posemb_") and "_to_" in key
    ),
]


def randomized(model: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Every parameter random (a zero head would make every model agree)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=std)
    return model.eval()


def images(size: int, dtype: torch.dtype = torch.float32, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, size, size, generator=generator, dtype=dtype) * 2 - 1


# --- the two resizes against big_vision -------------------------------------------------------


@pytest.mark.parametrize(("file", "source", "resized"), KERNELS, ids=[k[2] for k in KERNELS])
def test_pi_resize_matches_big_visions_resample_patchemb(file, source, resized) -> None:
    arrays = _fixture(file)
    expected = _hwio_to_ours(arrays[resized])
    got = resample_patch_embed(_hwio_to_ours(arrays[source]).float(), tuple(expected.shape[-2:]))
    torch.testing.assert_close(got.double(), expected.double(), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(("file", "source", "resized"), TABLES, ids=[t[2] for t in TABLES])
def test_flexi_table_resize_matches_big_visions_flexi_model(file, source, resized) -> None:
    arrays = _fixture(file)
    table = torch.from_numpy(arrays[source][0]).float()
    got = resample_flexi_pos_embed(table, _grid(source), _grid(resized))
    torch.testing.assert_close(
        got.double(), torch.from_numpy(arrays[resized][0]).double(), atol=TOLERANCE, rtol=0
    )


def test_pi_resize_inverts_the_resize_on_the_patches_a_shrink_and_grow_resize_keeps() -> None:
    """8x8 to 6x10 loses directions (README of the fixtures): <resize(x), w'> = <x, w> holds for
    the patches x = Rᵀy the resize R keeps, and the kernel stays of the input's size."""
    weight = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    resized = resample_patch_embed(weight, (6, 10))
    y = torch.randn(4, 3, 6, 10, dtype=torch.float64)
    z = torch.zeros(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    (F.interpolate(z, size=(6, 10), mode="bilinear", align_corners=False) * y).sum().backward()
    x = z.grad  # Rᵀy, the adjoint of the resize applied to y
    upsampled = F.interpolate(x, size=(6, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(
        torch.einsum("nipq, oipq -> no", upsampled, resized),
        torch.einsum("nipq, oipq -> no", x, weight),
    )
    assert resized.abs().max() < 10 * weight.abs().max()


def test_pi_resize_of_the_same_size_is_the_weight_itself() -> None:
    weight = torch.randn(5, 3, 4, 4)
    assert resample_patch_embed(weight, 4) is weight


def test_pi_resize_is_differentiable_in_the_weight() -> None:
    weight = torch.randn(5, 3, 4, 4, requires_grad=True)
    resample_patch_embed(weight, 6).square().sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_flexi_table_resize_keeps_the_class_token_row() -> None:
    table = torch.randn(1 + 16, 8)
    resized = resample_flexi_pos_embed(table, (4, 4), (2, 2), num_prefix_tokens=1)
    assert resized.shape == (1 + 4, 8)
    assert torch.equal(resized[0], table[0])


# --- the model at any patch size ------------------------------------------------------------


def test_twice_the_patch_on_an_image_upsampled_twice_gives_the_same_logits() -> None:
    """The paper's property: PI-resize inverts the upsampling of each patch.

    Patch by patch, since a whole-image resize also mixes neighbouring patches at their borders.
    """
    model = randomized(tiny_vit(image_size=16, patch_size=4).double())
    twin = tiny_vit(image_size=32, patch_size=8).double().eval()
    twin.load_state_dict(
        {
            **model.state_dict(),
            "patch_embed.proj.weight": resample_patch_embed(model.patch_embed.proj.weight, 8),
        }
    )
    x = images(16, torch.float64)
    patches = rearrange(x, "b c (h p) (w q) -> (b h w) c p q", p=4, q=4)
    upsampled = F.interpolate(patches, scale_factor=2, mode="bilinear", align_corners=False)
    x2 = rearrange(upsampled, "(b h w) c p q -> b c (h p) (w q)", b=2, h=4)
    with torch.no_grad():
        torch.testing.assert_close(twin(x2), model(x), atol=1e-12, rtol=0)


def test_forward_at_the_models_own_patch_size_is_the_plain_forward() -> None:
    model = randomized(tiny_vit())
    x = images(16)
    with torch.no_grad():
        assert torch.equal(model(x, patch_size=model.patch_size), model(x))


@pytest.mark.parametrize("pos_embed", ["learned", "sincos2d", "rope2d", "conditional"])
def test_a_model_converted_to_another_patch_size_computes_what_forward_at_it_does(pos_embed):
    """One rule for both: the learned table by FlexiViT's resize, the others for the grid."""
    model = randomized(tiny_vit(pos_embed=pos_embed, patch_size=4))
    converted = tiny_vit(pos_embed=pos_embed, patch_size=8).eval()
    converted.load_state_dict(state_dict_at_patch_size(model.state_dict(), converted))
    x = images(16)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x, patch_size=8), atol=1e-5, rtol=0)


def test_forward_features_takes_the_patch_size() -> None:
    model = randomized(tiny_vit(patch_size=4))
    with torch.no_grad():
        assert model.forward_features(images(16), patch_size=2).shape == (2, 1 + 8 * 8, 32)


def test_a_hybrid_counts_the_patch_size_in_cells_of_its_resnet_map() -> None:
    stem = ResNetV2((), width_factor=0.5)  # the root alone: stride 4, a 8x8 map of 32 pixels
    model = randomized(tiny_vit(image_size=32, patch_size=2, stem=stem), std=0.05)
    with torch.no_grad():
        assert model.forward_features(images(32), patch_size=4).shape == (2, 1 + 2 * 2, 32)


def test_a_pixel_stem_refuses_a_patch_size_finer_than_its_stride() -> None:
    model = tiny_vit(image_size=16, patch_size=8, stem="patchify_ln")
    with torch.no_grad():
        assert model.forward_features(images(16), patch_size=4).shape == (2, 1 + 4 * 4, 32)
    with pytest.raises(ValueError, match=r"patch_size=6 is not a multiple of 4.*PatchifyLN stem"):
        model(images(16), patch_size=6)


def test_flexi_patch_sizes_that_do_not_tile_the_image_are_refused() -> None:
    with pytest.raises(
        ValueError,
        match=r"model.flexi_patch_sizes=\[2, 3\]: patch_size=3 does not divide image_size=16; "
        r"valid patch sizes: \[1, 2, 4, 8, 16\]",
    ):
        tiny_vit(flexi_patch_sizes=[2, 3])


# --- the draws ------------------------------------------------------------------------------


def test_draws_depend_on_seed_and_step_alone_and_leave_the_global_rngs_alone() -> None:
    sizes = [2, 4, 8]
    first = [draw_patch_size(sizes, 7, step) for step in range(50)]
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    second = [draw_patch_size(sizes, 7, step) for step in range(50)]
    assert first == second, "another global RNG state, the same draws"
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    assert set(first) == set(sizes), "every size is drawn"
    assert first != [draw_patch_size(sizes, 8, step) for step in range(50)], "the seed matters"


class _PatchSizes(L.Callback):
    """The `patch_size` each backbone call got, by split."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int | None]] = {"train": [], "eval": []}
        self.logged: list[float] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self.seen["train" if module.training else "eval"].append(kwargs.get("patch_size"))

        pl_module.backbone.register_forward_pre_hook(record, with_kwargs=True)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.logged.append(float(trainer.callback_metrics["train/patch_size"]))


@pytest.fixture(scope="module")
def flexi_fit() -> _PatchSizes:
    """Four steps of a flexi ViT, validated once at the end."""
    torch.manual_seed(0)
    data = TensorDataset(images(16, batch=8), torch.arange(8) % 10)
    model = ImageClassifier(
        tiny_vit(flexi_patch_sizes=[2, 4, 8]),
        num_classes=10,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        config={"seed": 7},
    )
    probe = _PatchSizes()
    L.Trainer(
        accelerator="cpu",
        max_steps=4,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
    ).fit(model, DataLoader(data, batch_size=2), DataLoader(data, batch_size=4))
    return probe


def test_each_training_step_runs_at_the_size_drawn_for_its_seed_and_step(flexi_fit) -> None:
    expected = [draw_patch_size([2, 4, 8], 7, step) for step in range(4)]
    assert flexi_fit.seen["train"] == expected
    assert flexi_fit.logged == expected, "logged as train/patch_size"


def test_validation_runs_at_the_stored_patch_size(flexi_fit) -> None:
    assert flexi_fit.seen["eval"] and set(flexi_fit.seen["eval"]) == {None}


# --- checkpoints at another patch size ------------------------------------------------------


def test_a_lightning_checkpoint_loads_into_a_model_of_another_patch_size() -> None:
    stored = ImageClassifier(randomized(tiny_vit(patch_size=4)), num_classes=10)
    checkpoint = {"state_dict": stored.state_dict()}
    at_8 = ImageClassifier(tiny_vit(patch_size=8), num_classes=10).eval()
    at_8.on_load_checkpoint(checkpoint)
    at_8.load_state_dict(checkpoint["state_dict"])
    x = images(16)
    with torch.no_grad():
        torch.testing.assert_close(at_8(x), stored(x, patch_size=8), atol=1e-5, rtol=0)


TINY_RUN = (
    "data.image_size=16",
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.mlp_dim=64",
    "trainer.max_steps=2",
    "trainer.limit_val_batches=1",
    "scheduler.warmup_steps=1",
    "callbacks.progress_bar=null",
    "test=false",
)


def test_eval_of_a_checkpoint_at_another_patch_size_is_the_stored_models_forward_at_it(
    make_cfg, tmp_path
) -> None:
    train(make_cfg(*TINY_RUN))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    metrics = evaluate(make_cfg(f"ckpt_path={ckpt}", "+model.patch_size=8", config_name="eval"))

    cfg = make_cfg(*TINY_RUN)
    stored = build_classifier(cfg, with_optimizer=False).eval()
    stored.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    datamodule = instantiate(cfg.data, "data")
    datamodule.setup("test")
    correct = total = 0
    with torch.no_grad():
        for x, y in datamodule.test_dataloader():
            correct += int((stored(x, patch_size=8).argmax(-1) == y).sum())
            total += len(y)
    assert metrics["test/acc"] == pytest.approx(correct / total, abs=1e-6)


def test_from_official_npz_builds_the_file_at_another_patch_size() -> None:
    arrays = to_official(randomized(tiny_vit(patch_size=4)))
    stored, at_8 = from_official_npz(arrays), from_official_npz(arrays, patch_size=8)
    assert at_8.patch_size == 8 and at_8.pos_embed.pos_embedding.shape == (1, 1 + 2 * 2, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            at_8(images(16)), stored(images(16), patch_size=8), atol=1e-5, rtol=0
        )


def test_from_official_npz_at_another_resolution_keeps_the_originals_resize() -> None:
    arrays = to_official(randomized(tiny_vit(patch_size=4)))
    model = from_official_npz(arrays, image_size=24)
    assert model.patch_size == 4
    with torch.no_grad():
        torch.testing.assert_close(
            model(images(24)), from_official_npz(arrays)(images(24)), atol=1e-5, rtol=0
        )


def test_from_timm_builds_the_weights_at_another_patch_size() -> None:
    reference = timm.create_model(
        "vit_tiny_patch16_224", num_classes=7, img_size=32, patch_size=8, depth=1
    )
    randomized(reference, std=0.05)
    stored, at_4 = from_timm(reference), from_timm(reference, patch_size=4)
    assert at_4.patch_size == 4
    with torch.no_grad():
        torch.testing.assert_close(
            at_4(images(32)), stored(images(32), patch_size=4), atol=1e-5, rtol=0
        )
