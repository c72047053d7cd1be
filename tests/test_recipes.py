"""The paper recipes (`experiment=<model>_<dataset>`): each composes to the original's values.

The recipes need the published checkpoints, the datasets and a GPU, none of which the
suite has; so every recipe's key values are checked against the original's fine-tuning
setup (`vit_jax/configs/common.py`, `vit.py`, `mixer_base16_cifar10.py`), and one recipe,
shrunk to a tiny model on synthetic data, fine-tunes from an official-format file on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR
from vitlab.models.checkpoints import save_official_npz
from vitlab.models.vit import VisionTransformer
from vitlab.runs.tasks import train

VIT = {
    "vit_b16": "imagenet21k/ViT-B_16.npz",
    "vit_b32": "imagenet21k/ViT-B_32.npz",
    "vit_l16": "imagenet21k/ViT-L_16.npz",
    "vit_l32": "imagenet21k/ViT-L_32.npz",
    "r50_vit_b16": "imagenet21k/R50+ViT-B_16.npz",
}
DATA = {  # data target, steps
    "cifar10": ("vitlab.data.CIFAR10DataModule", 10_000),
    "cifar100": ("vitlab.data.CIFAR100DataModule", 10_000),
    "imagenet": ("vitlab.data.ImageFolderDataModule", 20_000),
}
# experiment -> (model config, data, checkpoint under ckpts/, lr, image_size, steps, warmup)
RECIPES = {
    **{
        f"{model}_{data}": (
            model,
            data,
            file,
            0.01 if (model, data) == ("vit_b16", "cifar10") else 0.03,
            384,
            DATA[data][1],
            500,
        )
        for model, file in VIT.items()
        for data in DATA
    },
    "mixer_b16_cifar10": (
        "mixer_b16",
        "cifar10",
        "mixer_models/imagenet21k/Mixer-B_16.npz",
        0.03,
        224,
        10_000,
        500,
    ),
    "mixer_l16_cifar10": (
        "mixer_l16",
        "cifar10",
        "mixer_models/imagenet21k/Mixer-L_16.npz",
        0.03,
        224,
        10_000,
        500,
    ),
    "vit_b16_cifar10_500steps": ("vit_b16", "cifar10", VIT["vit_b16"], 0.01, 384, 500, 50),
    "vit_b16_cifar10_1000steps": ("vit_b16", "cifar10", VIT["vit_b16"], 0.01, 384, 1000, 100),
}
# Width and depth that tell the zoo entries apart.
ARCHITECTURES = {
    "vit_b16": {"patch_size": 16, "hidden_size": 768, "num_layers": 12},
    "vit_b32": {"patch_size": 32, "hidden_size": 768, "num_layers": 12},
    "vit_l16": {"patch_size": 16, "hidden_size": 1024, "num_layers": 24},
    "vit_l32": {"patch_size": 32, "hidden_size": 1024, "num_layers": 24},
    "r50_vit_b16": {"patch_size": 1, "hidden_size": 768, "num_layers": 12},
    "mixer_b16": {"patch_size": 16, "hidden_dim": 768, "num_blocks": 12},
    "mixer_l16": {"patch_size": 16, "hidden_dim": 1024, "num_blocks": 24},
}
NOT_RECIPES = {"digits_demo"}


def _experiments() -> set[str]:
    return {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}


def test_every_paper_recipe_is_checked_here():
    recipes = {name for name in _experiments() if not name.startswith("augreg")} - NOT_RECIPES
    assert recipes == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_picks_the_papers_model_data_checkpoint_and_schedule(make_cfg, name):
    model, data, file, lr, image_size, steps, warmup = RECIPES[name]
    cfg = OmegaConf.to_container(make_cfg(f"experiment={name}"), resolve=True)
    architecture = ARCHITECTURES[model]
    assert {key: cfg["model"][key] for key in architecture} == architecture
    resnet = cfg["model"]["resnet_layers"] if cfg["model"].get("stem") == "resnet" else None
    assert resnet == ([3, 4, 9] if model == "r50_vit_b16" else None)
    assert cfg["data"]["_target_"] == DATA[data][0]
    assert Path(cfg["model"]["pretrained"]) == Path("ckpts") / file
    assert cfg["optimizer"]["lr"] == lr
    assert cfg["data"]["image_size"] == cfg["model"]["image_size"] == image_size
    assert cfg["trainer"]["max_steps"] == steps
    assert cfg["scheduler"]["warmup_steps"] == warmup


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_fine_tunes_as_the_original(make_cfg, name):
    """SGD momentum 0.9 without weight decay, batch 512, warmup + cosine, clipping at 1.0."""
    cfg = OmegaConf.to_container(make_cfg(f"experiment={name}"), resolve=True)
    assert cfg["optimizer"]["_target_"] == "torch.optim.SGD"
    assert cfg["optimizer"]["momentum"] == 0.9
    assert cfg["optimizer"]["weight_decay"] == 0.0
    assert cfg["scheduler"]["_target_"] == "vitlab.training.optim.warmup_cosine"
    assert cfg["data"]["batch_size"] == 512
    assert cfg["trainer"]["gradient_clip_val"] == 1.0
    assert cfg["trainer"]["gradient_clip_algorithm"] == "norm"
    assert cfg["trainer"]["max_epochs"] == -1, "the step count, not an epoch limit, ends the run"
    assert cfg["loss"]["label_smoothing"] == 0.0
    assert cfg["model"].get("dropout_rate", 0.0) == 0.0, "the published numbers are dropout 0"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_preprocesses_as_the_original(make_cfg, name):
    """Inception crop (5-100% of the area, aspect 3/4..4/3) and flip; the data maps pixels to [-1, 1]."""
    data = make_cfg(f"experiment={name}").data
    assert list(data.train_crop_scale) == [0.05, 1.0]
    assert list(data.train_crop_ratio) == pytest.approx([3 / 4, 4 / 3])
    assert data.hflip is True


def test_imagenet_data_is_the_image_folder_layout_with_1000_classes(make_cfg, tmp_path):
    data = make_cfg("data=imagenet").data
    assert data._target_ == "vitlab.data.ImageFolderDataModule"
    assert data.num_classes == 1000
    assert Path(data.data_dir) == tmp_path / "data" / "imagenet"


def test_finetune_lr_sweep_is_the_originals_grid():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["experiment=vit_b16_cifar10", "sweep=finetune_lr"],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params == {"optimizer.lr": "0.001,0.003,0.01,0.03"}


def test_a_shrunk_recipe_fine_tunes_from_an_official_file_on_the_cpu(make_cfg, tmp_path):
    """experiment=vit_b16_cifar10 with a tiny ViT on synthetic data: loads the file, runs SGD."""
    upstream = VisionTransformer(
        image_size=16, patch_size=4, num_classes=21, hidden_size=64, num_layers=4,
        num_heads=4, mlp_dim=128,
    )  # fmt: skip
    file = save_official_npz(upstream, tmp_path / "upstream.npz")
    cfg = make_cfg(
        "experiment=vit_b16_cifar10",
        "model=vit_tiny",
        f"model.pretrained={file}",
        "data=synthetic",
        "data.image_size=32",
        "data.num_classes=10",
        "data.batch_size=16",
        "data.num_samples=32",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "scheduler.warmup_steps=1",
    )
    train(cfg)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    [group, *_] = checkpoint["optimizer_states"][0]["param_groups"]
    assert (group["initial_lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 0.0)
    block = checkpoint["state_dict"]["backbone.blocks.0.mlp.fc1.weight"]
    moved = (block - upstream.blocks[0].mlp.fc1.weight).abs().max()
    assert 0 < moved < 0.1, "starts from the file's weights and takes small SGD steps"
