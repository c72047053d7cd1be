"""Stratified k-fold cross-validation of a training pool: `data.num_folds`, `data.fold`.

With `num_folds=k`, a datamodule's training pool (every image that is not in the
test set) is cut into k folds; run `fold=i` trains on the other k - 1 folds and
validates on fold i. The folds are disjoint, cover the pool, and each holds every
class in the pool's proportions (to within one image: scikit-learn's
`StratifiedKFold`). They are drawn from `split_seed` alone, so the k runs of a
study, whatever their global seeds, see the same partition, and the test set
never moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from annotated_types import Ge
from sklearn.model_selection import StratifiedKFold

from vitlab.errors import ConfigError

NumFolds = Annotated[int, Ge(2)]
"""A number of folds: one fold cannot hold data out and still leave some to train on."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def fold_problem(num_folds: Any, fold: Any) -> str | None:
    """Why `data.num_folds` and `data.fold` do not make a fold, or None.

    `num_folds=None` turns cross-validation off, and then `fold` must stay 0: a fold
    without folds would silently train on the usual split.
    """
    if num_folds is not None and not (_is_int(num_folds) and num_folds >= 2):
        return (
            f"data.num_folds={num_folds!r} must be an integer >= 2 (the number of folds), "
            "or null for the usual validation split"
        )
    if not (_is_int(fold) and fold >= 0):
        return f"data.fold={fold!r} must be an integer >= 0 (the held-out fold)"
    if num_folds is None and fold != 0:
        return (
            f"data.fold={fold} needs data.num_folds, which is null (cross-validation off); "
            f"set data.num_folds to the number of folds (more than {fold}), or data.fold=0"
        )
    if num_folds is not None and fold >= num_folds:
        return (
            f"data.fold={fold} is not a fold of data.num_folds={num_folds}; "
            f"use data.fold in 0..{num_folds - 1}"
        )
    return None


def fold_indices(
    labels: Sequence[int] | np.ndarray, num_folds: int, fold: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): positions in `labels` of the training folds and of held-out fold `fold`.

    Both are sorted int64 arrays; together they are every position once. The
    partition depends only on the labels, `num_folds` and `seed`. A class with fewer
    images than folds is missing from some folds (scikit-learn warns); a pool too
    small for `num_folds` is a `ConfigError`.
    """
    labels = np.asarray(labels)
    problem = fold_problem(num_folds, fold)
    if problem:
        raise ConfigError(problem)
    _, counts = np.unique(labels, return_counts=True)
    largest = int(counts.max()) if len(counts) else 0
    if num_folds > largest:
        fix = f"data.num_folds <= {largest}" if largest >= 2 else "data.num_folds=null"
        raise ConfigError(
            f"data.num_folds={num_folds} is more than the {largest} images of the largest "
            f"class in the training pool of {len(labels)} images, so the folds cannot be "
            f"stratified; use {fix}"
        )
    splitter = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    train, val = list(splitter.split(np.zeros(len(labels)), labels))[fold]
    return train.astype(np.int64), val.astype(np.int64)
