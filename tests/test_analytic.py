"""The analytic head against an independent reference: ridge regression on the stacked data (numpy lstsq on the
augmented system [X; sqrt(lam) I] W = [Y; 0]), whatever the split over clients and tasks and the order."""

import numpy as np
import pytest
import torch

from common.analytic import HeadSums, RandomFeatures, feature_sums, ridge_head


def _data(seed: int, n: int, p: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _reference(X: np.ndarray, labels: np.ndarray, classes: int, ridge: float) -> np.ndarray:
    Y = np.eye(classes)[labels]
    lam = ridge * (X**2).sum(0).mean()
    A = np.vstack([X, np.sqrt(lam) * np.eye(X.shape[1])])
    return np.linalg.lstsq(A, np.vstack([Y, np.zeros((X.shape[1], classes))]), rcond=None)[0].T


@pytest.mark.parametrize("ridge", [1e-3, 0.1, 10.0])
def test_sums_over_clients_and_tasks_give_the_ridge_solution_on_the_stacked_data(ridge):
    p, classes = 12, 6
    parts = [_data(s, n, p, classes) for s, n in enumerate([30, 1, 17, 8])]  # one client with a single sample
    sums = HeadSums.zeros(p, classes)
    for x, y in parts:
        sums.add(*feature_sums(x, y, classes), len(y))
    X = torch.cat([x for x, _ in parts]).numpy()
    labels = torch.cat([y for _, y in parts]).numpy()
    np.testing.assert_allclose(ridge_head(sums, ridge).numpy(), _reference(X, labels, classes, ridge), rtol=1e-9,
                               atol=1e-12)
    assert sums.n == len(labels)


def test_order_and_split_do_not_change_the_head():
    p, classes = 8, 4
    x, y = _data(3, 60, p, classes)
    one, other = HeadSums.zeros(p, classes), HeadSums.zeros(p, classes)
    one.add(*feature_sums(x, y, classes), 60)
    for idx in reversed(np.array_split(np.random.default_rng(0).permutation(60), 5)):
        other.add(*feature_sums(x[idx], y[idx], classes), len(idx))
    torch.testing.assert_close(ridge_head(other, 0.01), ridge_head(one, 0.01), rtol=1e-10, atol=1e-12)


def test_more_features_than_samples_and_unseen_classes_are_well_posed():
    p, classes = 40, 5
    x, y = _data(1, 10, p, 3)  # classes 3 and 4 unseen so far
    sums = HeadSums.zeros(p, classes)
    sums.add(*feature_sums(x, y, classes), 10)
    W = ridge_head(sums, 0.1)
    assert W.shape == (classes, p) and torch.isfinite(W).all()
    assert torch.equal(W[3:], torch.zeros(2, p, dtype=torch.float64))
    assert ridge_head(sums, 0.1, classes=3).shape == (3, p)
    np.testing.assert_allclose(ridge_head(sums, 0.1).numpy(), _reference(x.numpy(), y.numpy(), classes, 0.1),
                               rtol=1e-9, atol=1e-12)


def test_bad_input_is_refused():
    sums = HeadSums.zeros(4, 3)
    with pytest.raises(ValueError, match="ridge must be > 0"):
        ridge_head(sums, 0.0)
    with pytest.raises(ValueError, match="labels outside"):
        feature_sums(torch.ones(2, 4), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="do not fit"):
        sums.add(torch.zeros(5, 5), torch.zeros(5, 3), 1)


def test_random_features_are_seeded_and_the_same_in_every_call():
    rf = RandomFeatures(d=6, dim=9, seed=4)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    before = torch.rand(2)
    torch.manual_seed(1)
    h = rf(x)
    assert torch.equal(torch.rand(2), before)  # the global stream is left alone
    assert h.shape == (3, 9) and (h >= 0).all()
    assert torch.equal(h, RandomFeatures(d=6, dim=9, seed=4)(x, RandomFeatures(6, 9, 4).matrix))
    assert not torch.equal(h, RandomFeatures(d=6, dim=9, seed=5)(x))
