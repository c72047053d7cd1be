"""Every config under conf/ composes, and the composed config has the promised shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, CONFIG_GROUPS, config_options

GROUPS = CONFIG_GROUPS


@pytest.mark.parametrize(
    "override", [f"{group}={name}" for group in GROUPS for name in config_options(group)]
)
def test_every_config_file_composes_and_resolves(make_cfg, override):
    cfg = make_cfg(override)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def test_eval_config_composes(make_cfg):
    cfg = make_cfg("ckpt_path=x.ckpt", config_name="eval")
    assert cfg.ckpt_path == "x.ckpt"


def test_train_config_has_the_documented_groups_and_keys(make_cfg):
    cfg = make_cfg()
    for key in (
        "model",
        "data",
        "optimizer",
        "scheduler",
        "trainer",
        "callbacks",
        "logger",
        "paths",
        "extras",
        "seed",
    ):
        assert key in cfg, key
    assert cfg.model.image_size == cfg.data.image_size
    assert cfg.model.num_classes == cfg.data.num_classes
    assert cfg.model.num_channels == cfg.data.num_channels


def test_every_config_group_folder_is_covered_by_this_test():
    folders = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} - {"paths", "extras", "hydra"}
    assert folders <= set(GROUPS), f"add {folders - set(GROUPS)} to GROUPS"


def test_unknown_option_lists_the_valid_choices(make_cfg):
    with pytest.raises(MissingConfigException, match=r"(?s)model/no_such_model.*vit_tiny"):
        make_cfg("model=no_such_model")


def test_run_folders_are_dated_and_unique():
    hydra_cfg = yaml.safe_load((Path(CONF_DIR) / "hydra" / "default.yaml").read_text())
    fresh = "${vitlab.unique:${paths.log_dir}/${task_name}/runs/${now:%Y-%m-%d}_${now:%H-%M-%S}}"
    assert hydra_cfg["run"]["dir"] == f"${{vitlab.run_folder:${{oc.select:run_dir,null}},{fresh}}}"
    assert (
        hydra_cfg["sweep"]["dir"]
        == "${vitlab.unique:${paths.log_dir}/${task_name}/multiruns/${now:%Y-%m-%d}_${now:%H-%M-%S}}"
    )
    assert hydra_cfg["sweep"]["subdir"] == "${hydra.job.num}"


def _help_groups(config_name: str, *overrides: str) -> dict[str, list[str]]:
    """The `group: options` lines of `src/<config_name>.py --help`, from its help template."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
        template = cfg.hydra.help.template
    GlobalHydra.instance().clear()
    lines = (line.split(": ", 1) for line in template.splitlines() if ": " in line)
    return {group: options.split(", ") for group, options in lines}


def test_help_lists_the_groups_of_the_entry_point_and_not_the_fragments_they_include():
    groups = _help_groups("train", "experiment=vit_b16_cifar10")
    assert {"model", "data", "optimizer", "trainer", "experiment", "sweep"} <= set(groups)
    assert "vit_b16" in groups["model"] and "vit_b16_cifar10" in groups["experiment"]
    assert not any("/" in group for group in groups), "no family bases, no recipe fragments"
    assert "family" not in groups["model"] and "finetune" not in groups["experiment"]


def test_eval_help_lists_only_the_groups_eval_takes():
    groups = _help_groups("eval", "ckpt_path=x.ckpt")
    assert {"model", "data", "trainer", "logger"} <= set(groups)
    assert not {"optimizer", "scheduler", "experiment", "sweep"} & set(groups)
