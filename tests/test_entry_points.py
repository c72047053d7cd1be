"""The command-line entry points, as a user runs them (subprocesses: each pays the imports)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import run_train_py

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_train_py(*args, cwd=cwd)


def test_train_py_fast_dev_run_prints_config_metrics_and_run_folder(tmp_path):
    result = _run("debug=fdr", "extras.print_config=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CONFIG" in result.stdout
    assert "Final metrics" in result.stdout
    assert "Run folder:" in result.stdout
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / ".hydra" / "config.yaml").is_file()
    assert (runs[0] / "metrics.json").is_file()


def test_bad_patch_size_exits_nonzero_with_a_short_message(tmp_path):
    result = _run("model.patch_size=5", cwd=tmp_path)
    assert result.returncode == 2
    assert "patch_size=5" in result.stderr and "valid patch sizes" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_model_exits_nonzero_listing_the_choices(tmp_path):
    result = _run("model=no_such_model", cwd=tmp_path)
    assert result.returncode != 0
    assert "vit_tiny" in result.stderr and "Traceback" not in result.stderr


def test_help_lists_the_options_a_user_picks_and_not_the_fragments_they_include(tmp_path):
    result = _run("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (models,) = (line for line in result.stdout.splitlines() if line.startswith("model: "))
    assert "vit_b16" in models.removeprefix("model: ").split(", ")
    assert "model/family" not in result.stdout and "experiment/finetune" not in result.stdout
    assert "experiment: " in result.stdout and "trainer: " in result.stdout


def test_a_renamed_key_exits_naming_its_new_name(tmp_path):
    result = _run("classifier.label_smoothing=0.1", cwd=tmp_path)
    assert result.returncode == 2
    assert "classifier.label_smoothing was renamed to loss.label_smoothing" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists(), "refused before anything was built"
