"""Every zoo config composes with Hydra, instantiates, and has the published parameter count.

Counts are at 224x224, 3 channels, 1000 classes; the models are built on the meta
device, so even ViT-H/14 costs no memory. ViT/hybrid counts match the original's
configs (`vit_jax/configs/models.py`: no pre-logits), Mixer counts its Table 1,
gMLP counts timm's `gmlp_*_224` models.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vitlab.models import MlpMixer, ResNetV2, VisionTransformer

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
ZOO = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))

PARAMETER_COUNTS = {
    "vit_ti16": 5_717_416,
    "vit_s16": 22_050_664,
    "vit_s32": 22_878_952,
    "vit_b8": 86_576_872,
    "vit_b16": 86_567_656,
    "vit_b32": 88_224_232,
    "vit_l16": 304_326_632,
    "vit_l32": 306_535_400,
    "vit_h14": 632_045_800,
    # gap: no class token and one position fewer than the token version.
    "vit_s16_gap": 22_050_664 - 2 * 384,
    "vit_s32_gap": 22_878_952 - 2 * 384,
    "vit_b16_gap": 86_567_656 - 2 * 768,
    "vit_b32_gap": 88_224_232 - 2 * 768,
    "mixer_b16": 59_880_472,
    "mixer_b32": 60_293_428,
    "mixer_l16": 208_196_168,
    # gMLP: timm's gmlp_ti16_224, gmlp_s16_224, gmlp_b16_224 (no official release).
    "gmlp_ti16": 5_867_328,
    "gmlp_s16": 19_422_656,
    "gmlp_b16": 73_075_392,
    "r_vit_ti16": 6_337_704,
    "r26_vit_s32": 36_431_912,
    "r26_vit_b32": 101_383_976,
    "r50_vit_b16": 98_659_112,
    "r50_vit_l32": 328_994_856,
}
# Mixer-S/8, S/16, S/32, L/32, H/14: the paper's Table 1 dims; no published counts.
# vit_tiny, mixer_tiny, gmlp_tiny: the digits demo's models, near one another in size.
UNPUBLISHED = {
    "mixer_s8",
    "mixer_s16",
    "mixer_s32",
    "mixer_l32",
    "mixer_h14",
    "vit_tiny",
    "mixer_tiny",
    "gmlp_tiny",
}


@pytest.fixture(scope="module")
def primary_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A primary config with only `model` and the `data` node the models read."""
    root = tmp_path_factory.mktemp("zoo_conf")
    (root / "zoo.yaml").write_text(
        "defaults:\n  - model: vit_tiny\n  - _self_\n"
        "data:\n  image_size: 224\n  num_channels: 3\n  num_classes: 1000\n"
        f"hydra:\n  searchpath:\n    - file://{CONF_DIR}\n"
    )
    return root


def compose_model(config_dir: Path, name: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name="zoo", overrides=[f"model={name}"])
    return cfg.model


def build(model_cfg: DictConfig) -> torch.nn.Module:
    """Instantiate as `vitlab.runs.build.build_backbone` does: resolved, `pretrained` popped first."""
    node = OmegaConf.to_container(model_cfg, resolve=True)
    node.pop("pretrained")
    with torch.device("meta"):
        return instantiate(node)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_zoo_config_has_a_published_count_or_is_listed_as_unpublished() -> None:
    assert set(ZOO) == set(PARAMETER_COUNTS) | UNPUBLISHED


@pytest.mark.parametrize("name", ZOO)
def test_zoo_config_starts_with_a_comment_naming_the_model(name: str) -> None:
    text = (CONF_DIR / "model" / f"{name}.yaml").read_text()
    assert text.startswith("# ")


@pytest.mark.parametrize("name", ZOO)
def test_zoo_config_reads_its_input_from_data_and_has_no_pretrained_file(
    primary_config_dir: Path, name: str
) -> None:
    cfg = compose_model(primary_config_dir, name)
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert raw["image_size"] == "${data.image_size}"
    assert raw["num_channels"] == "${data.num_channels}"
    assert raw["num_classes"] == "${data.num_classes}"
    assert raw["pretrained"] is None


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_zoo_model_has_the_published_parameter_count(primary_config_dir: Path, name: str) -> None:
    model = build(compose_model(primary_config_dir, name))
    assert count(model) == PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", sorted(UNPUBLISHED))
def test_unpublished_zoo_model_instantiates(primary_config_dir: Path, name: str) -> None:
    assert count(build(compose_model(primary_config_dir, name))) > 0


@pytest.mark.parametrize("name", ["r_vit_ti16", "r26_vit_s32", "r50_vit_b16", "r50_vit_l32"])
def test_hybrid_config_instantiates_its_resnet_stem_recursively(
    primary_config_dir: Path, name: str
) -> None:
    model = build(compose_model(primary_config_dir, name))
    assert isinstance(model, VisionTransformer)
    assert isinstance(model.stem, ResNetV2)


def test_mixer_config_has_no_position_encoding(primary_config_dir: Path) -> None:
    # The key exists (null) so that setting it reaches MlpMixer's explanation, not Hydra's "not in struct".
    cfg = compose_model(primary_config_dir, "mixer_b16")
    assert cfg.pos_embed is None
    assert isinstance(build(cfg), MlpMixer)


def test_hybrid_stem_follows_data_num_channels(primary_config_dir: Path) -> None:
    with initialize_config_dir(config_dir=str(primary_config_dir), version_base="1.3"):
        cfg = compose(config_name="zoo", overrides=["model=r50_vit_b16", "data.num_channels=1"])
    assert build(cfg.model).stem.conv_root.in_channels == 1
