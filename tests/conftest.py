"""Shared fixtures: compose the real configs in-process, pointed at a temporary folder.

Composing in-process (instead of running `src/train.py` in a subprocess) keeps the
suite fast: `import lightning` costs seconds, and we pay it once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from vitlab.models import VisionTransformer
from vitlab.runs.folders import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# The config groups a user picks an option of (`group=option`); a test asserts it lists every folder.
CONFIG_GROUPS = [
    "model",
    "data",
    "optimizer",
    "scheduler",
    "trainer",
    "callbacks",
    "logger",
    "experiment",
    "debug",
    "sweep",
]


def config_options(group: str) -> list[str]:
    """The options of a config group: the YAML files of `conf/<group>/`, without nested folders."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# As the entry points do: conf/hydra/default.yaml names the run folders with vitlab's resolvers.
register_resolvers()
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# The speed paths' measured choices (`vitlab.models.kernel_choice`) go to a file of this
# run, not to the user's cache; the subprocesses of the suite share it.
os.environ.setdefault(
    "VITLAB_KERNEL_CACHE", str(Path(tempfile.mkdtemp(prefix="vitlab-kernels-")) / "kernels.json")
)


def run_train_py(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python src/train.py args` in `cwd`, W&B offline, output captured.

    Outputs go under `cwd` (VITLAB_ROOT is dropped); `tests` is importable, so the
    processes a run starts (DDP ranks, submitit jobs) can load test-only callbacks.
    A hung process fails the test after `timeout` seconds instead of hanging CI.
    """
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    full_env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HYDRA_FULL_ERROR": "0",
        "PYTHONPATH": pythonpath,
        **(env or {}),
    }
    full_env.pop("VITLAB_ROOT", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compose_config(config_name: str, overrides: list[str], tmp_path: Path) -> DictConfig:
    """The config `src/<config_name>.py overrides...` would run, with every output under `tmp_path`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.extras.print_config = False
    del cfg.hydra
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """`make_cfg("model=vit_tiny", ..., config_name="train")` -> a composed config writing to tmp_path.

    The Hydra state it sets (`${hydra:...}` resolves against it) is cleared afterwards,
    so no later test sees this one's run.
    """

    def make(*overrides: str, config_name: str = "train") -> DictConfig:
        return compose_config(config_name, list(overrides), tmp_path)

    yield make
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


def tiny_vit(**overrides: Any) -> VisionTransformer:
    """A ViT small enough for any test: 16x16 RGB input, 4x4 patches, width 32, 2 layers, 10 classes."""
    kwargs = dict(
        image_size=16,
        patch_size=4,
        num_classes=10,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        mlp_dim=64,
    )
    return VisionTransformer(**{**kwargs, **overrides})


def wait_until_wandb_run_is_written(path: Path, timeout_s: float = 20.0) -> Path:
    """Wait for the exit record of an offline `run-*.wandb` file.

    `wandb.finish()` returns before wandb's service has flushed the file (its last
    block can arrive a moment later), so a test that reads it at once can see a tail missing.
    """
    from vitlab.reports import read_wandb_run

    deadline = time.monotonic() + timeout_s
    while read_wandb_run(path).exit_code is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return path
