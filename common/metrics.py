"""Class-incremental metrics from the accuracy matrix.

``acc[t][j]`` is the accuracy (in %) on task j's test classes measured after training task t, for j <= t;
entries with j > t are undefined (NaN). Predictions are argmax over every class seen so far, so a task's
accuracy already includes confusion with the other tasks' classes; the task-aware accuracy leaves that out.
"""

from __future__ import annotations

import numpy as np


def square_matrix(rows: list[list[float]]) -> np.ndarray:
    """Lower-triangular rows (row t holds tasks 0..t) -> a square matrix with NaN above the diagonal."""
    n = len(rows)
    out = np.full((n, n), np.nan)
    for t, row in enumerate(rows):
        out[t, : len(row)] = row
    return out


def _square(acc: np.ndarray | list[list[float]]) -> np.ndarray:
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"accuracy matrix must be square (tasks x tasks), got shape {a.shape}")
    return a


def average_accuracy(acc: np.ndarray | list[list[float]], after_task: int | None = None) -> float:
    """Mean over tasks 0..t of acc[t][j]; with t = last task this is FAA, the final average accuracy."""
    a = _square(acc)
    t = a.shape[0] - 1 if after_task is None else after_task
    return float(np.mean(a[t, : t + 1]))


def average_forgetting(acc: np.ndarray | list[list[float]]) -> float:
    """Mean over j < T-1 of (best accuracy ever had on task j before the last task) - (its final accuracy).

    Zero for a single task (nothing can be forgotten yet).
    """
    a = _square(acc)
    last = a.shape[0] - 1
    if last == 0:
        return 0.0
    drops = [np.max(a[j:last, j]) - a[last, j] for j in range(last)]
    return float(np.mean(drops))


def pooled_accuracy(acc: np.ndarray | list[list[float]], samples: list[int], after_task: int | None = None) -> float:
    """Accuracy over every test sample of the tasks seen after task t, pooled (the reference implementation's
    FAA): the mean of acc[t][j] weighted by task j's test samples ``samples[j]``. Equal to ``average_accuracy``
    when every task has as many test samples."""
    a = _square(acc)
    t = a.shape[0] - 1 if after_task is None else after_task
    weights = np.asarray(samples[: t + 1], dtype=np.float64)
    return float(np.dot(a[t, : t + 1], weights) / weights.sum())


def forgetting_after_learning(acc: np.ndarray | list[list[float]]) -> float:
    """Mean over j < T-1 of acc[j][j] (just after learning task j) - acc[T-1][j] (the reference's forgetting;
    ``average_forgetting`` takes the best earlier accuracy instead, so it is never smaller)."""
    a = _square(acc)
    last = a.shape[0] - 1
    if last == 0:
        return 0.0
    return float(np.mean([a[j, j] - a[last, j] for j in range(last)]))


def task_aware_accuracy_per_task(logits: np.ndarray, labels: np.ndarray, tasks: list[list[int]]) -> list[float]:
    """Accuracy (%) on each task's classes when the task is known: argmax within its own block of logits.

    logits: (N, C) over global class ids; labels: (N,). Never below the class-incremental accuracy of the same
    samples (a right global argmax is also right within the block), so the gap between the two is what the
    confusion between tasks' blocks costs.
    """
    predictions = np.full(len(labels), -1)
    for classes in tasks:
        mask = np.isin(labels, classes)
        if mask.any():  # accuracy_per_task names a task without samples
            block = np.asarray(classes)
            predictions[mask] = block[np.argmax(logits[mask][:, block], axis=1)]
    return accuracy_per_task(predictions, labels, tasks)


def accuracy_per_task(
    predictions: np.ndarray, labels: np.ndarray, tasks: list[list[int]]
) -> list[float]:
    """Accuracy (%) on each task's classes. predictions, labels: (N,) global class ids."""
    out = []
    for classes in tasks:
        mask = np.isin(labels, classes)
        if not mask.any():
            raise ValueError(f"no test samples for classes {classes[0]}..{classes[-1]}")
        out.append(float(100.0 * np.mean(predictions[mask] == labels[mask])))
    return out
