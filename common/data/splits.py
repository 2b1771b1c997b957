"""Seeded per-class selections of sample indices: stratified train/test splits, per-class caps, validation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from torch.utils.data import Subset

from common.data.stream import DataError, Stream


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


def holdout_validation(stream: Stream, fraction: float, seed: int) -> Stream:
    """``stream`` with ``fraction`` of every class's training samples moved to a validation set that replaces test.

    The test split is left out entirely, so settings chosen on the result never saw it. Seeded and stratified
    (``stratified_split``), hence the same on the server and on every client.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"{stream.name}: validation fraction must be in (0, 1), got {fraction}")
    train, val = stratified_split(stream.train_labels, fraction, seed)
    if len(np.unique(stream.train_labels[val])) < len(np.unique(stream.train_labels)):
        raise DataError(f"{stream.name}: validation fraction {fraction} leaves some class without validation samples")
    return replace(
        stream,
        train=Subset(stream.train, train.tolist()),
        test=Subset(stream.train, val.tolist()),
        train_labels=stream.train_labels[train],
        test_labels=stream.train_labels[val],
    )
