"""Hydra multiruns as a user starts them: `python src/train.py -m ...` in a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import wait_until_wandb_run_is_written
from vitlab.reports import read_wandb_run

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    # No scheduler.warmup_steps: the default warmup (100) is cut to these 3 steps.
]


def _multirun(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "src" / "train.py"),
            "-m",
            *overrides,
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=sweep_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _status(job: Path) -> dict:
    return json.loads((job / "status.json").read_text())


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The patch x position x precision sweep, its grid narrowed to 2 x 2 x 2 from the command line."""
    sweep_dir = tmp_path_factory.mktemp("grid") / "sweep"
    result = _multirun(
        sweep_dir, "sweep=patch_pos_precision", "model.pos_embed=learned,sincos2d", *TINY
    )
    return sweep_dir, result


def test_a_one_epoch_sweep_of_two_jobs_trains_on_the_default_config(tmp_path):
    """What a newcomer's first sweep looks like: nothing but the axis and a shorter run."""
    sweep_dir = tmp_path / "sweep"
    result = _multirun(sweep_dir, "model.patch_size=4,8", "trainer.max_epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [_status(job)["status"] for job in jobs] == ["completed", "completed"]
    assert "warming up for all" in result.stderr + result.stdout


def test_grid_sweep_runs_every_job_of_the_overridden_grid(tiny_grid):
    sweep_dir, result = tiny_grid
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 8
    seen = set()
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        seen.add(
            tuple(
                sorted(
                    o
                    for o in overrides
                    if not o.startswith(("trainer.limit", "trainer.max", "scheduler"))
                )
            )
        )
        assert _status(job)["status"] == "completed"
        assert (job / ".hydra" / "config.yaml").is_file()
        assert (job / "csv" / "metrics.csv").is_file()
        assert "test/acc" in json.loads((job / "metrics.json").read_text())
    assert len(seen) == 8
    pos = {o for combo in seen for o in combo if o.startswith("model.pos_embed")}
    assert pos == {"model.pos_embed=learned", "model.pos_embed=sincos2d"}


def test_compare_on_the_grid_writes_a_row_per_job_and_the_plots(tiny_grid):
    sweep_dir, _ = tiny_grid
    spec = importlib.util.spec_from_file_location("compare", ROOT / "src" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    assert compare.main([str(sweep_dir)]) == 0
    rows = (sweep_dir / "compare.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 8
    assert {"model.patch_size", "model.pos_embed", "trainer.precision"} <= set(rows[0].split(","))
    for plot in ("val_acc_curves.png", "acc_vs_patch_size.png", "acc_vs_throughput.png"):
        assert (sweep_dir / plot).stat().st_size > 0, plot


@pytest.fixture(scope="module")
def sweep_with_a_failure(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Two jobs under W&B (offline): job 0 has an impossible patch size, job 1 trains."""
    sweep_dir = tmp_path_factory.mktemp("failing") / "sweep"
    return sweep_dir, _multirun(sweep_dir, "model.patch_size=5,4", "logger=wandb", *TINY)


def test_failed_job_is_recorded_and_the_others_still_run(sweep_with_a_failure):
    sweep_dir, result = sweep_with_a_failure
    assert result.returncode != 0, "a sweep with a failed job must exit non-zero"
    failed, completed = _status(sweep_dir / "0"), _status(sweep_dir / "1")
    assert failed["status"] == "failed" and "patch_size=5" in failed["error"]
    assert completed["status"] == "completed"
    assert "FAILED job 0" in result.stderr


def test_wandb_run_of_a_job_has_the_sweep_group_its_overrides_as_name_and_tags_and_the_config(
    sweep_with_a_failure,
):
    sweep_dir, _ = sweep_with_a_failure
    (run_file,) = (sweep_dir / "1" / "wandb").glob("offline-run-*/run-*.wandb")
    run = read_wandb_run(wait_until_wandb_run_is_written(run_file))
    assert run.group == sweep_dir.name
    assert "model.patch_size=4" in run.name.split(",")
    assert "model.patch_size=4" in run.tags and "logger=wandb" in run.tags
    assert run.config["config"]["model"]["patch_size"] == 4
    assert run.config["config"]["optimizer"]["_target_"] == "torch.optim.AdamW"
    assert run.exit_code == 0


def test_optuna_search_runs_its_trials_into_sqlite(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = _multirun(sweep_dir, "sweep=lr_wd_optuna", "hydra.sweeper.n_trials=2", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (sweep_dir / "optuna.db").is_file()
    lrs = {
        json.loads((sweep_dir / job / "status.json").read_text())["overrides"][0]
        for job in ("0", "1")
    }
    assert all(o.startswith("optimizer.lr=") for o in lrs) and len(lrs) == 2
