"""The class-incremental stream every loader returns, and how its classes are cut into tasks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset


class DataError(ValueError):
    """A data set is missing or malformed, or cannot be split or partitioned as asked."""


# eq=False: numpy fields make a generated __eq__ ambiguous; identity is what caches and callers need.
@dataclass(frozen=True, eq=False)
class Stream:
    """A class-incremental stream: global class ids, their task blocks and the train/test images.

    Items of ``train``/``test`` are ``(x, y)`` with ``x: float32 (3, H, W)`` normalised and ``y`` the global class
    id; ``train_labels: (N_train,)`` and ``test_labels: (N_test,)`` (int64) are aligned with them, so partitions
    are computed without touching a single image.
    """

    name: str
    class_names: list[str]
    tasks: list[list[int]]
    train: Dataset
    test: Dataset
    train_labels: np.ndarray
    test_labels: np.ndarray


def class_blocks(domain_sizes: Sequence[int], classes_per_task: int, *, stream: str) -> list[list[int]]:
    """Global class ids of each task: every domain (a run of consecutive ids) cut into equal contiguous blocks.

    A task never straddles two domains, and every task has the same size, so the accuracy matrix compares like
    with like; a block size that does not divide a domain is refused instead of leaving a ragged last task.
    """
    if classes_per_task < 1:
        raise DataError(f"{stream}: classes-per-task must be >= 1, got {classes_per_task}")
    tasks: list[list[int]] = []
    start = 0
    for size in domain_sizes:
        if size % classes_per_task:
            raise DataError(
                f"{stream}: classes-per-task {classes_per_task} does not divide a domain of {size} classes"
            )
        tasks += [list(range(lo, lo + classes_per_task)) for lo in range(start, start + size, classes_per_task)]
        start += size
    return tasks
