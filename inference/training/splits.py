"""Seeded, stratified splits for cross-validation and the inner validation split.

The outer split assigns each case to one of ``k`` folds keeping the FPE rate of every fold
close to the cohort's; a fold fixed in the manifest wins. Inside each training fold an inner
validation split (stratified again) is held out for early stopping, the decision threshold
and the calibration, so nothing is chosen on the fold that is reported.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_folds(
    labels: Sequence[int], n_folds: int, seed: int, fixed: Sequence[int | None] | None = None
) -> list[int]:
    """Fold number (0-based) for each case.

    Each class is shuffled with ``seed`` and dealt round-robin over the folds, continuing where
    the previous class stopped, so fold sizes differ by at most one and class rates are balanced.
    Cases with a ``fixed`` fold keep it.
    """
    if n_folds < 2:
        raise ValueError("cross-validation needs at least 2 folds")
    label_array = np.asarray(labels, dtype=np.int64)
    fixed_folds = list(fixed) if fixed is not None else [None] * label_array.size
    if len(fixed_folds) != label_array.size:
        raise ValueError("fixed folds must match the labels")
    for fold in fixed_folds:
        if fold is not None and not 0 <= fold < n_folds:
            raise ValueError(f"fixed fold {fold} outside 0..{n_folds - 1}")
    free = [i for i, fold in enumerate(fixed_folds) if fold is None]
    rng = np.random.default_rng(seed)
    folds: list[int] = [fold if fold is not None else -1 for fold in fixed_folds]
    offset = 0
    for value in (1, 0):
        members = np.array([i for i in free if label_array[i] == value], dtype=np.int64)
        rng.shuffle(members)
        for position, index in enumerate(members):
            folds[int(index)] = (offset + position) % n_folds
        offset = (offset + members.size) % n_folds
    return folds


def inner_validation_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (into ``labels``) of the inner training and validation parts, stratified.

    At least one case of each present class goes to validation and at least one stays for
    training.
    """
    if not 0 < fraction < 1:
        raise ValueError("validation fraction must lie in (0, 1)")
    label_array = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    validation: list[int] = []
    for value in (0, 1):
        members = np.flatnonzero(label_array == value)
        rng.shuffle(members)
        if members.size == 0:
            continue
        n_val = int(round(members.size * fraction))
        n_val = min(max(n_val, 1), max(members.size - 1, 1)) if members.size > 1 else 0
        validation.extend(int(i) for i in members[:n_val])
        train.extend(int(i) for i in members[n_val:])
    return sorted(train), sorted(validation)
