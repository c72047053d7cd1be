"""Run folders, and the OmegaConf resolvers that `conf/hydra/default.yaml` names them with.

A run writes into `logs/<task>/runs/<date>_<time>` (a multirun job into
`logs/<task>/multiruns/<date>_<time>/<n>`), never into another run's folder; `run_dir=`
names the folder instead, to resume it. Hydra resolves these folders before it calls the
task function, so the resolvers must exist before `hydra.main` runs: the entry points
call `register_resolvers()` first (and so do the launchers, in each job's own process).
The help resolver makes `--help` list the groups a user picks from, not the fragments
their options include (`model/family`, `experiment/finetune`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from vitlab.errors import ConfigError, exit_with
from vitlab.runs.multirun import is_global_zero

_UNIQUE_DIRS: dict[str, str] = {}


def unique_dir(path: str) -> str:
    """`path`, or `path_2`, `path_3`, ... if it exists: a new run never reuses a folder.

    Remembered per process, so every resolution of `hydra.run.dir` in one run
    agrees even after the folder has been created.
    """
    if path not in _UNIQUE_DIRS:
        candidate, n = path, 1
        while os.path.exists(candidate):
            n += 1
            candidate = f"{path}_{n}"
        _UNIQUE_DIRS[path] = candidate
    return _UNIQUE_DIRS[path]


def run_folder(run_dir: str | None, fresh: str) -> str:
    """`hydra.run.dir`: the folder named by `run_dir=` (to resume it), else `fresh`."""
    return str(run_dir) if run_dir else fresh


def config_subdir(output_dir: str, resume: str | bool | None, ckpt_path: str | None) -> str | None:
    """`hydra.output_subdir`: `.hydra` for a new run folder, `.hydra/resume_<n>` when resuming one,
    none on ranks above 0.

    A folder that already holds a run (its `.hydra/config.yaml`) may only be written
    to by a run that resumes it (`resume=auto` or a `ckpt_path`): anything else would
    mix two runs' checkpoints and logs. This runs while Hydra sets up the folder,
    before it writes anything, so the refused run leaves the old one untouched.
    """
    if not is_global_zero():  # srun / torchrun ranks: rank 0 records the config
        return None
    folder = Path(output_dir)
    if not (folder / ".hydra" / "config.yaml").is_file():
        return ".hydra"
    if not (resume == "auto" or ckpt_path):
        exit_with(
            ConfigError(
                f"the run folder {folder} already holds a run; to continue it add resume=auto "
                "(or ckpt_path=last), or pick a new folder (leave run_dir and hydra.run.dir unset "
                "for a fresh dated one)"
            )
        )
    n = 2
    while (folder / ".hydra" / f"resume_{n}").exists():
        n += 1
    return f".hydra/resume_{n}"


def config_groups(choices: Mapping[str, str | None]) -> str:
    """The `--help` list of groups: one line `group: option, option, ...` per group of the
    primary config (`hydra.runtime.choices`), for `conf/hydra/default.yaml`'s help template.

    Hydra's own list (`$APP_CONFIG_GROUPS`) holds every folder of `conf/`, also those whose
    files only other configs include (the model family bases, the fine-tuning fragments),
    and groups the entry point does not use. The primary config's groups are the
    top-level keys of its choices; the included ones are nested (`model/family`).
    """
    loader = GlobalHydra.instance().config_loader()
    groups = sorted(key for key in choices if "/" not in key and key != "hydra")
    return "\n".join(
        f"{group}: {', '.join(sorted(loader.get_group_options(group)))}" for group in groups
    )


def register_resolvers() -> None:
    """Register `vitlab.unique`, `vitlab.run_folder`, `vitlab.config_subdir` and
    `vitlab.config_groups`; call it before Hydra composes a config that names them."""
    OmegaConf.register_new_resolver("vitlab.unique", unique_dir, replace=True)
    OmegaConf.register_new_resolver("vitlab.run_folder", run_folder, replace=True)
    OmegaConf.register_new_resolver("vitlab.config_subdir", config_subdir, replace=True)
    OmegaConf.register_new_resolver("vitlab.config_groups", config_groups, replace=True)
