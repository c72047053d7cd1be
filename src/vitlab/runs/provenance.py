"""What code and which packages produced a run, written into its folder at the start.

A result is only worth keeping if it can be traced back: `<run>/provenance.json`
holds the git commit of the vitlab checkout and whether it had uncommitted changes,
the Python version and the versions of the packages that decide the numerics.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only

PACKAGES = (
    "vitlab", "torch", "torchvision", "lightning", "torchmetrics",
    "hydra-core", "omegaconf", "einops", "numpy", "wandb",
)  # fmt: skip
CODE_DIR = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=CODE_DIR, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def package_versions(packages: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """The installed version of each package, None for one that is not installed."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def provenance() -> dict[str, Any]:
    """Git commit and dirty state of the code (None outside a git checkout), Python and package versions."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "command": sys.argv,
        "packages": package_versions(),
    }


@rank_zero_only
def record_provenance(output_dir: str | Path) -> None:
    """Write `<output_dir>/provenance.json` (global rank 0 only: DDP ranks share the folder)."""
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "provenance.json").write_text(json.dumps(provenance(), indent=2) + "\n")
