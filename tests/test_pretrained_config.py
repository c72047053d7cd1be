"""`model.pretrained=<file.npz>` on a zoo config loads through the pipeline and reproduces the JAX logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.test_parity_jax import FIXTURES, read_fixture, run
from vitlab.runs.build import build_backbone


def _overrides(meta: dict, image_size: int) -> list[str]:
    """Hydra overrides that turn a zoo config into the fixture's tiny architecture."""
    config = meta["config"]
    common = [
        "data=synthetic",
        f"data.image_size={image_size}",
        f"data.num_classes={meta['num_classes']}",
        "data.num_channels=3",
        f"model.patch_size={config['patches']['size'][0]}",
    ]
    if meta["kind"] == "Mixer":
        return [
            "model=mixer_s16",
            *common,
            f"model.hidden_dim={config['hidden_dim']}",
            f"model.num_blocks={config['num_blocks']}",
            f"model.tokens_mlp_dim={config['tokens_mlp_dim']}",
            f"model.channels_mlp_dim={config['channels_mlp_dim']}",
        ]
    resnet = config.get("resnet")
    model = (
        [
            "model=r_vit_ti16",
            f"model.resnet_layers={list(resnet['num_layers'])}",
            f"model.resnet_width_factor={resnet['width_factor']}",
        ]
        if resnet
        else ["model=vit_ti16"]
    )
    transformer = config["transformer"]
    return [
        *model,
        *common,
        f"model.hidden_size={config['hidden_size']}",
        f"model.num_layers={transformer['num_layers']}",
        f"model.num_heads={transformer['num_heads']}",
        f"model.mlp_dim={transformer['mlp_dim']}",
        f"model.classifier={config['classifier']}",
        f"model.representation_size={config['representation_size'] or 'null'}",
        "model.dropout_rate=0.0",
    ]


def _official_file(path: Path, tmp_path: Path) -> tuple[Path, dict, dict]:
    params, reference, meta = read_fixture(path)
    file = tmp_path / f"{path.stem}.npz"
    np.savez(file, **params)
    return file, reference, meta


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_pretrained_key_loads_the_file_and_matches_jax_logits(path, make_cfg, tmp_path):
    file, reference, meta = _official_file(path, tmp_path)
    cfg = make_cfg(*_overrides(meta, meta["image_size"]), f"model.pretrained={file}")
    logits = run(build_backbone(cfg.model), reference["input"])
    np.testing.assert_allclose(logits, reference["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "path", [p for p in FIXTURES if "mixer" not in p.stem], ids=lambda p: p.stem
)
def test_pretrained_key_at_a_larger_image_size_matches_jax_resize(path, make_cfg, tmp_path):
    file, reference, meta = _official_file(path, tmp_path)
    cfg = make_cfg(*_overrides(meta, meta["resize"]["image_size"]), f"model.pretrained={file}")
    backbone = build_backbone(cfg.model)
    np.testing.assert_allclose(
        backbone.pos_embed.pos_embedding.detach().numpy(),
        reference["resize/posemb"],
        atol=1e-5,
        rtol=0,
    )
    logits = run(backbone, reference["resize/input"])
    np.testing.assert_allclose(logits, reference["resize/logits"], atol=1e-5, rtol=0)
