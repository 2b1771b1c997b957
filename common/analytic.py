"""A closed-form (analytic) classifier over every class seen: ridge regression of one-hot labels on head inputs.

    W = (sum X^T X + lam I)^-1 sum X^T Y          X: (n, p) head inputs, Y: (n, C) one-hot, W: (p, C)

Only the two sums are needed, so clients can send theirs at a task end (plainly or through secure aggregation)
and the server keeps running totals over clients and tasks: the result does not depend on how the data is split
or in which order the parts arrive. This is the classifier of RanPAC (McDonnell et al., NeurIPS 2023), with its
optional fixed random projection and ReLU before the regression (``RandomFeatures``).

``lam = ridge * mean(diag(sum X^T X))``: scale-free, as ``common/merges.py``'s ridge. All arithmetic is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class HeadSums:
    """Running sums over clients and tasks: G = sum X^T X (p, p), C = sum X^T Y (p, num_classes), n samples."""

    G: Tensor
    C: Tensor
    n: int = 0

    @classmethod
    def zeros(cls, p: int, num_classes: int) -> "HeadSums":
        return cls(torch.zeros(p, p, dtype=torch.float64), torch.zeros(p, num_classes, dtype=torch.float64))

    def add(self, G: Tensor, C: Tensor, n: int, lo: int = 0) -> None:
        """Add G: (p, p) and C: (p, m), the sums of classes lo..lo+m-1 (by default every class), over n samples."""
        p, classes = self.C.shape
        if G.shape != self.G.shape or C.ndim != 2 or C.shape[0] != p or not 0 <= lo <= classes - C.shape[1]:
            raise ValueError(f"sums of shapes {tuple(G.shape)}, {tuple(C.shape)} at class {lo} do not fit "
                             f"{tuple(self.G.shape)}, {tuple(self.C.shape)}")
        self.G += G.to(torch.float64)
        self.C[:, lo:lo + C.shape[1]] += C.to(torch.float64)
        self.n += n

    def state_dict(self) -> dict:
        return {"G": self.G, "C": self.C, "n": self.n}

    @classmethod
    def from_state_dict(cls, state: dict) -> "HeadSums":
        return cls(state["G"], state["C"], int(state["n"]))


def feature_sums(x: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(X^T X (p, p), X^T Y (p, num_classes)) of head inputs x: (n, p) with global class ids ``labels``: (n,)."""
    x = x.to(torch.float64)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    C = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=x.device)
    C.index_add_(1, labels.to(x.device), x.T)
    return x.T @ x, C


def ridge_head(sums: HeadSums, ridge: float, classes: int | None = None) -> Tensor:
    """The classifier's weight (classes, p) for the first ``classes`` columns of the sums (all by default):
    solve((G + lam I), C) by Cholesky; ``ridge`` > 0 makes the system positive definite."""
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0 for a well-posed solve, got {ridge}")
    G, C = sums.G, sums.C[:, : classes if classes is not None else sums.C.shape[1]]
    scale = float(G.diagonal().mean()) or 1.0
    L = torch.linalg.cholesky(G + ridge * scale * torch.eye(G.shape[0], dtype=G.dtype, device=G.device))
    return torch.cholesky_solve(C, L).T


def head_rows(sums: HeadSums, ridge: float, classes: int) -> tuple[Tensor, Tensor]:
    """The whole head as the model holds it, float32: (weight (num_classes, p) with ``ridge_head``'s rows for the
    first ``classes`` and zeros for classes not seen yet, bias (num_classes,) zero: ridge on uncentred features
    has no intercept)."""
    weight = torch.zeros(sums.C.shape[1], sums.C.shape[0])
    weight[:classes] = ridge_head(sums, ridge, classes).to(torch.float32)
    return weight, torch.zeros(sums.C.shape[1])


@dataclass(frozen=True)
class RandomFeatures:
    """h = relu(x P), P: (d, dim) with N(0, 1) entries from its own seeded generator (the same in every process)."""

    d: int
    dim: int
    seed: int = 0

    @property
    def matrix(self) -> Tensor:
        return torch.randn(self.d, self.dim, generator=torch.Generator().manual_seed(self.seed))

    def __call__(self, x: Tensor, P: Tensor | None = None) -> Tensor:
        """x: (n, d) -> (n, dim); pass ``P`` (``self.matrix``) to avoid drawing it again."""
        P = self.matrix if P is None else P
        return torch.relu(x.to(torch.float32) @ P.to(x.device))
