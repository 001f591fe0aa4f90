"""Seeded, stratified split assignment for datasets that ship without official splits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split


def stratified_split(
    labels: Sequence[int], ratios: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> list[str]:
    """Assign 'train'/'val'/'test' to each row, stratified by label, deterministic by seed."""
    n = len(labels)
    y = np.asarray(labels)
    idx = np.arange(n)
    strat = y if _stratifiable(y, ratios[2]) else None
    rest, test = train_test_split(idx, test_size=ratios[2], random_state=seed, stratify=strat)
    val_frac = ratios[1] / (ratios[0] + ratios[1])
    strat = y[rest] if _stratifiable(y[rest], val_frac) else None
    train, val = train_test_split(rest, test_size=val_frac, random_state=seed, stratify=strat)
    out = [""] * n
    for name, part in (("train", train), ("val", val), ("test", test)):
        for i in part:
            out[int(i)] = name
    return out


def kfold_split(labels: Sequence[int], fold: int, k: int = 10, seed: int = 0) -> list[str]:
    """Fold `fold` of `k`: the k test folds are disjoint and cover every row; val is the next fold."""
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in [0, {k}), got {fold}")
    y = np.asarray(labels)
    _, counts = np.unique(y, return_counts=True)
    # Stratify when every class can appear in every fold; otherwise plain shuffled folds
    # (still disjoint and covering every row) rather than refusing a small dataset.
    folds = StratifiedKFold if counts.min() >= k else KFold
    parts = [test for _, test in folds(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)]
    out = ["train"] * len(y)
    for i in parts[fold]:
        out[int(i)] = "test"
    for i in parts[(fold + 1) % k]:
        out[int(i)] = "val"
    return out


def _stratifiable(y: np.ndarray, frac: float) -> bool:
    # sklearn refuses stratification when a class has < 2 members or the split is too small.
    _, counts = np.unique(y, return_counts=True)
    return bool(counts.min() >= 2 and frac * len(y) >= len(counts))
