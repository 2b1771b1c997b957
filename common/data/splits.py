"""Seeded per-class selections of sample indices: stratified train/test splits and per-class caps."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``labels: (N,)`` into sorted (train, test) index arrays, each class in the same proportion.

    Per class, round(test_fraction * n_c) samples of a seeded permutation go to test, so the split does not
    depend on how the classes happen to be ordered on disk.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def cap_per_class(labels: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Sorted indices into ``labels: (N,)`` keeping at most ``cap`` seeded-random samples per class (None: all)."""
    if cap is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(np.flatnonzero(labels == c))[:cap] for c in np.unique(labels)]
    return np.sort(np.concatenate(kept)) if kept else np.arange(0)
