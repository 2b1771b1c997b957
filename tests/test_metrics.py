import numpy as np
import pytest

from common.metrics import (
    accuracy_per_task, average_accuracy, average_forgetting, forgetting_after_learning, pooled_accuracy,
    square_matrix, task_aware_accuracy_per_task,
)


def test_faa_and_forgetting_by_hand():
    nan = np.nan
    acc = [[90.0, nan, nan], [70.0, 80.0, nan], [60.0, 75.0, 50.0]]
    assert average_accuracy(acc) == pytest.approx((60 + 75 + 50) / 3)
    assert average_accuracy(acc, after_task=1) == pytest.approx(75.0)
    # task 0: best 90 -> 60 (30); task 1: best 80 -> 75 (5)
    assert average_forgetting(acc) == pytest.approx(17.5)


def test_the_reference_conventions_by_hand():
    nan = np.nan
    acc = [[90.0, nan, nan], [95.0, 80.0, nan], [60.0, 75.0, 50.0]]
    # just after learning: task 0 90 -> 60 (30), task 1 80 -> 75 (5); best earlier would give 35 for task 0
    assert forgetting_after_learning(acc) == pytest.approx(17.5)
    assert average_forgetting(acc) == pytest.approx(20.0)
    # pooled over samples: 100 + 300 + 100 test images
    assert pooled_accuracy(acc, [100, 300, 100]) == pytest.approx((60 * 100 + 75 * 300 + 50 * 100) / 500)
    assert pooled_accuracy(acc, [100, 300, 100], after_task=1) == pytest.approx((95 * 100 + 80 * 300) / 400)
    assert pooled_accuracy(acc, [7, 7, 7]) == pytest.approx(average_accuracy(acc))


def test_square_matrix_puts_nan_above_the_diagonal_of_the_stored_rows():
    a = square_matrix([[90.0], [70.0, 80.0], [60.0, 75.0, 50.0]])
    assert a.shape == (3, 3)
    assert np.isnan(a[np.triu_indices(3, 1)]).all()
    assert a[np.tril_indices(3)].tolist() == [90.0, 70.0, 80.0, 60.0, 75.0, 50.0]
    assert average_accuracy(a) == pytest.approx((60 + 75 + 50) / 3)


def test_single_task_has_no_forgetting():
    assert average_forgetting([[42.0]]) == 0.0


def test_non_square_matrix_is_rejected():
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[1.0, 2.0]])


def test_accuracy_per_task_counts_each_block():
    labels = np.array([0, 0, 1, 2, 3, 3])
    preds = np.array([0, 1, 1, 2, 0, 3])
    assert accuracy_per_task(preds, labels, [[0, 1], [2, 3]]) == pytest.approx([200 / 3, 200 / 3])
    with pytest.raises(ValueError, match="no test samples"):
        accuracy_per_task(preds, labels, [[7]])


def test_task_aware_accuracy_takes_the_argmax_within_each_block():
    tasks = [[0, 1], [2, 3]]
    logits = np.array([
        [0.0, 1.0, 5.0, 0.0],  # label 1: wrong globally (class 2), right within block 0
        [2.0, 1.0, 0.0, 0.0],  # label 1: wrong in both
        [0.0, 0.0, 1.0, 3.0],  # label 3: right in both
        [9.0, 0.0, 1.0, 0.0],  # label 2: wrong globally, right within block 1
    ])
    labels = np.array([1, 1, 3, 2])
    assert task_aware_accuracy_per_task(logits, labels, tasks) == [50.0, 100.0]
    assert accuracy_per_task(logits.argmax(axis=1), labels, tasks) == [0.0, 50.0]
