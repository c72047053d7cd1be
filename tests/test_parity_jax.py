"""Our models reproduce the original JAX/Flax models (`tests/fixtures/README.md`) in float32.

Each fixture is a tiny model with random parameters under the published checkpoint
names, an NHWC input and the original's outputs. Loaded through our npz reader,
our logits must match to 1e-5; exact GELU or symmetric padding would not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vitlab.models import MlpMixer, ResNetV2, VisionTransformer, from_official_npz, load_pretrained

# The original JAX models' outputs (tests/fixtures/README.md); the FlexiViT and ToMe
# references beside them hold resizes and a timm model, tested in test_flexi / test_tome.
OTHER_REFERENCES = ("flexi_", "tome_")
FIXTURES = sorted(
    path
    for path in (Path(__file__).parent / "fixtures").glob("*.npz")
    if not path.stem.startswith(OTHER_REFERENCES)
)
ATOL = 1e-5
# Feature maps before GroupNorm reach ~10; float32 sums over 7x7x3 taps differ by ~1e-5 there.
FEATURE_MAP_TOL = {"atol": 1e-4, "rtol": 1e-5}


def read_fixture(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """(official parameters, `fixture/*` reference arrays, the fixture's config)."""
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    params = {n: a for n, a in arrays.items() if not n.startswith("fixture/")}
    reference = {
        n.removeprefix("fixture/"): a for n, a in arrays.items() if n.startswith("fixture/")
    }
    return params, reference, json.loads(str(reference.pop("config_json")))


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def run(model: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(nchw(images)).numpy()


def equivalent_model(meta: dict) -> nn.Module:
    """The constructor call that matches a fixture's original config."""
    config = meta["config"]
    patch_size = config["patches"]["size"][0]
    if meta["kind"] == "Mixer":
        return MlpMixer(
            image_size=meta["image_size"],
            patch_size=patch_size,
            num_classes=meta["num_classes"],
            hidden_dim=config["hidden_dim"],
            num_blocks=config["num_blocks"],
            tokens_mlp_dim=config["tokens_mlp_dim"],
            channels_mlp_dim=config["channels_mlp_dim"],
        )
    resnet = config.get("resnet")
    return VisionTransformer(
        image_size=meta["image_size"],
        patch_size=patch_size,
        num_classes=meta["num_classes"],
        hidden_size=config["hidden_size"],
        num_layers=config["transformer"]["num_layers"],
        num_heads=config["transformer"]["num_heads"],
        mlp_dim=config["transformer"]["mlp_dim"],
        classifier=config["classifier"],
        representation_size=config["representation_size"],
        stem=ResNetV2(resnet["num_layers"], resnet["width_factor"]) if resnet else None,
    )


@pytest.fixture(params=FIXTURES, ids=lambda p: p.stem)
def fixture(request: pytest.FixtureRequest) -> tuple[dict, dict, dict]:
    return read_fixture(request.param)


def test_logits_match_jax_reference(fixture: tuple[dict, dict, dict]) -> None:
    params, reference, _ = fixture
    logits = run(from_official_npz(params), reference["input"])
    np.testing.assert_allclose(logits, reference["logits"], atol=ATOL, rtol=0)


def test_model_from_file_has_the_reference_parameter_count(
    fixture: tuple[dict, dict, dict],
) -> None:
    params, _, meta = fixture
    assert sum(p.numel() for p in from_official_npz(params).parameters()) == meta["num_params"]


def test_load_pretrained_into_equivalent_model_gives_reference_logits(
    fixture: tuple[dict, dict, dict],
) -> None:
    params, reference, meta = fixture
    model = equivalent_model(meta)
    load_pretrained(model, params)
    np.testing.assert_allclose(
        run(model, reference["input"]), reference["logits"], atol=ATOL, rtol=0
    )


def test_encoder_output_matches_jax_reference(fixture: tuple[dict, dict, dict]) -> None:
    params, reference, _ = fixture
    model = from_official_npz(params)
    with torch.no_grad():
        tokens = model.forward_features(nchw(reference["input"])).numpy()
    expected = reference[
        "intermediates/pre_head_layer_norm"
        if isinstance(model, MlpMixer)
        else "intermediates/Transformer"
    ]
    np.testing.assert_allclose(tokens, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["hybrid_tiny", "hybrid_stem_only"])
def test_hybrid_root_conv_pads_like_tf_same(name: str) -> None:
    """The 7x7/2 StdConv on an even input: the extra padding row/column goes bottom/right."""
    params, reference, _ = read_fixture(Path(__file__).parent / "fixtures" / f"{name}.npz")
    model = from_official_npz(params)
    with torch.no_grad():
        root = model.stem.conv_root(nchw(reference["input"])).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(root, reference["intermediates/conv_root"], **FEATURE_MAP_TOL)


def test_hybrid_stem_feature_map_matches_jax_reference() -> None:
    params, reference, _ = read_fixture(Path(__file__).parent / "fixtures" / "hybrid_tiny.npz")
    model = from_official_npz(params)
    with torch.no_grad():
        features = model.stem(nchw(reference["input"])).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(features, reference["intermediates/block2"], **FEATURE_MAP_TOL)


RESIZABLE = [p for p in FIXTURES if "fixture/resize/logits" in np.load(p).files]


@pytest.fixture(params=RESIZABLE, ids=lambda p: p.stem)
def resizable(request: pytest.FixtureRequest) -> tuple[dict, dict, dict]:
    return read_fixture(request.param)


def test_resized_position_embedding_matches_jax_reference(
    resizable: tuple[dict, dict, dict],
) -> None:
    params, reference, _ = resizable
    model = from_official_npz(params, image_size=reference["resize/input"].shape[1])
    posemb = model.pos_embed.pos_embedding.detach().numpy()
    np.testing.assert_allclose(posemb, reference["resize/posemb"], atol=ATOL, rtol=0)


def test_resized_model_logits_match_jax_reference(resizable: tuple[dict, dict, dict]) -> None:
    params, reference, _ = resizable
    model = from_official_npz(params, image_size=reference["resize/input"].shape[1])
    np.testing.assert_allclose(
        run(model, reference["resize/input"]), reference["resize/logits"], atol=ATOL, rtol=0
    )


def test_from_official_npz_reads_a_file_path(tmp_path: Path) -> None:
    params, reference, _ = read_fixture(FIXTURES[0])
    np.savez(tmp_path / "model.npz", **params)
    logits = run(from_official_npz(tmp_path / "model.npz"), reference["input"])
    np.testing.assert_allclose(logits, reference["logits"], atol=ATOL, rtol=0)
