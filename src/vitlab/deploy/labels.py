"""Class names for a model's outputs, and `labels.json`, the file an export writes them to.

A run checkpoint knows its names (saved with its hyperparameters, or given by its
data config); an official or timm file knows only its class count, and a 1000-class
head is ImageNet-1k's, whose names torchvision ships in its weights' metadata (no
download). Anything else is named by its index.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitlab.errors import CheckpointError, VitlabError

if TYPE_CHECKING:
    from vitlab.deploy.source import ModelSource

LABELS_FILE = "labels.json"
IMAGENET_1K_CLASSES = 1000


def class_names_for(source: ModelSource) -> list[str]:
    """The name of each of the model's classes, in label order.

    The checkpoint's own names first; then ImageNet-1k's for a 1000-class official or
    timm file; else the indices as strings ("0", "1", ...).
    """
    if source.class_names is not None:
        return list(source.class_names)
    num_classes = int(source.model.num_classes)
    if source.kind in ("official", "timm") and num_classes == IMAGENET_1K_CLASSES:
        return imagenet_1k_names()
    return [str(index) for index in range(num_classes)]


def imagenet_1k_names() -> list[str]:
    """ImageNet-1k's 1000 class names in label order, from torchvision's bundled metadata."""
    from torchvision.models import ViT_B_16_Weights

    return list(ViT_B_16_Weights.IMAGENET1K_V1.meta["categories"])


def data_config_names(data: Mapping[str, Any] | None) -> list[str] | None:
    """The class names the datamodule of a data config gives, or None if it gives none.

    The datamodule is built (which touches no data) and asked; one whose names live
    on disk that is gone, or that cannot be built here, gives None.
    """
    if not data or "_target_" not in data:
        return None
    from vitlab.runs.build import instantiate

    try:
        names = instantiate(dict(data), "data").class_names
    except (VitlabError, OSError, ImportError):
        return None
    return None if names is None else [str(name) for name in names]


def write_labels_json(names: Sequence[str], folder: str | Path) -> Path:
    """Write `<folder>/labels.json`: the class names in label order; returns its path."""
    path = Path(folder) / LABELS_FILE
    path.write_text(json.dumps({"class_names": list(names)}, indent=2) + "\n")
    return path


def read_labels_json(path: str | Path) -> list[str]:
    """The class names of a `labels.json` (the file, or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / LABELS_FILE
    try:
        names = json.loads(path.read_text())["class_names"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path} is not a readable labels.json ({type(err).__name__}: {err}); "
            'it holds {"class_names": [...]}'
        ) from err
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f'{path}: "class_names" must be a list of strings')
    return names
