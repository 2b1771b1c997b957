"""Closed-form LoRM merges: pure functions of tensors, batched over layers, on the device of their inputs.

Every merge here has the RegMean form

    W* = (sum_i W_i G_i) pinv(sum_i G_i)            num: (..., m, d), den: (..., d, d) or (..., d) diagonal

which is the exact minimiser of sum_i ||X_i W^T - X_i W_i^T||^2 when G_i = X_i^T X_i (and of the same problem
on "augmented" data when G_i is shrunk, since alpha G + (1 - alpha) diag(G) is again a Gram matrix). So the
merges need only sums over clients: ``RoundSums`` adds one client at a time (memory O(1) in the number of
clients, and the same terms a client could send through secure aggregation), then ``solve_layers`` solves
all layers at once, one batched Cholesky per group of equal shapes.

Solving ``num @ pinv(den)`` (``solve_regmean``):
- Diagonal den: elementwise division; a zero entry (a feature no client ever saw) gives a zero column, which
  is exactly what the pseudo-inverse gives.
- Dense den: rows/columns whose diagonal is zero are an exact zero block (a PSD matrix with G_jj = 0 has
  G_j. = 0), so they are replaced by the identity and the matching columns of num by 0: the result equals
  num @ pinv(den) with no pseudo-inverse. What remains is positive definite whenever alpha < 1 (the shrunk
  diagonal part is), and is solved by Cholesky. Only where Cholesky still fails (alpha = 1 with fewer rows
  than features, or a rank-deficient A in a B-round) does it fall back to a float64 pseudo-inverse, for those
  layers only, with a log line.
- ``ridge`` (default 0, the paper's exact merge) adds ridge * mean(diag(den)) to the diagonal of the seen
  features: a scale-free Tikhonov term for users whose statistics are badly conditioned.
All arithmetic is float64.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)

Factor = Literal["A", "B"]


class MergeError(ValueError):
    """A merge that cannot be computed from what it was given (no clients, inconsistent layers)."""


def _f64(t: Tensor, device: torch.device | str | None = None) -> Tensor:
    return t.to(device=device, dtype=torch.float64)


def is_diagonal(den: Tensor, num: Tensor) -> bool:
    """A Gram given as its diagonal vector: den (..., d) beside num (..., m, d)."""
    return den.ndim == num.ndim - 1


def times_gram(W: Tensor, G: Tensor) -> Tensor:
    """W G for W: (..., m, d) and G: (..., d, d) dense or (..., d) diagonal."""
    return W * G.unsqueeze(-2) if G.ndim == W.ndim - 1 else W @ G


def project_gram(A: Tensor, G: Tensor) -> Tensor:
    """A G A^T: (..., r, r) for A: (..., r, d) and G dense (..., d, d) or diagonal (..., d)."""
    return times_gram(A, G) @ A.transpose(-1, -2)


def _ridge(diag: Tensor, seen: Tensor, ridge: float) -> Tensor:
    """ridge * mean of the seen diagonal entries, (..., 1): a Tikhonov term in the data's own scale."""
    return ridge * (diag * seen).sum(-1, keepdim=True) / seen.sum(-1, keepdim=True).clamp(min=1)


def solve_regmean(num: Tensor, den: Tensor, ridge: float = 0.0) -> Tensor:
    """num @ pinv(den), batched: num (..., m, d); den (..., d) diagonal or (..., d, d) symmetric PSD.

    See the module docstring for how zero features, ridge and singular systems are handled.
    """
    if is_diagonal(den, num):
        seen = den > 0
        scaled = torch.where(seen, den + _ridge(den, seen, ridge), torch.ones_like(den))
        return torch.where(seen.unsqueeze(-2), num / scaled.unsqueeze(-2), torch.zeros_like(num))
    d = den.shape[-1]
    diag = den.diagonal(dim1=-2, dim2=-1)
    seen = diag > 0
    eye = torch.eye(d, dtype=den.dtype, device=den.device)
    mask = seen.unsqueeze(-1) & seen.unsqueeze(-2)
    lam = _ridge(diag, seen, ridge).squeeze(-1)
    system = torch.where(mask, den, torch.zeros_like(den)) + eye * torch.where(
        seen, lam.unsqueeze(-1).expand_as(diag), torch.ones_like(diag)
    ).unsqueeze(-1)
    rhs = torch.where(seen.unsqueeze(-2), num, torch.zeros_like(num))
    L, info = torch.linalg.cholesky_ex(system)
    out = torch.cholesky_solve(rhs.transpose(-1, -2), L).transpose(-1, -2)
    failed = info != 0
    if failed.any():
        log.warning("Cholesky failed on %d of %d systems: pseudo-inverse for those", int(failed.sum()), failed.numel())
        out[failed] = rhs[failed] @ torch.linalg.pinv(system[failed], hermitian=True)
    return out


def solve_layers(num: Mapping[str, Tensor], den: Mapping[str, Tensor], ridge: float = 0.0) -> dict[str, Tensor]:
    """``solve_regmean`` for every layer, one batched solve per group of layers with equal shapes.

    num[name]: (m, d); den[name]: (d,) or (d, d). ViT-B/16 has 4 shape groups of 12 layers each.
    """
    if set(num) != set(den):
        raise MergeError(f"num and den name different layers: {sorted(set(num) ^ set(den))[:3]}")
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name in num:
        groups[(tuple(num[name].shape), tuple(den[name].shape), num[name].device)].append(name)
    out = {}
    for names in groups.values():
        solved = solve_regmean(torch.stack([num[n] for n in names]), torch.stack([den[n] for n in names]), ridge)
        out |= dict(zip(names, solved.unbind(0)))
    return out


def round_terms(
    factor: Factor, trained: Tensor, shared: Tensor, gram: Tensor, projected: bool = False
) -> tuple[Tensor, Tensor]:
    """One client's (num, den) terms of a round merge for one layer, float64 on the inputs' device.

    A-round (B shared, drops out):  num = A_i G_i (r, d_in),          den = G_i (d_in,) or (d_in, d_in)
    B-round (A shared):             num = B_i (A G_i A^T) (d_out, r), den = A G_i A^T (r, r)
    trained: A_i (r, d_in) or B_i (d_out, r); shared: the frozen factor (A: (r, d_in) in a B-round);
    gram: G_i, or with ``projected`` (B-rounds only) the client's own A G_i A^T: (r, r).
    """
    trained, gram = _f64(trained), _f64(gram, trained.device)
    if factor == "A":
        if projected:
            raise MergeError("an A-round merge needs the Grams themselves, not their projection")
        return times_gram(trained, gram), gram
    P = gram if projected else project_gram(_f64(shared, trained.device), gram)
    return trained @ P, P


@dataclass
class RoundSums:
    """Sums over clients of ``round_terms`` per layer; ``solve()`` gives the merged factor per layer.

    B* = (sum_i B_i A G_i A^T) pinv(A (sum_i G_i) A^T);  A* = (sum_i A_i G_i) pinv(sum_i G_i).
    A client whose Grams are zero (no samples) adds nothing.
    """

    factor: Factor
    shared: Mapping[str, Tensor]  # the frozen factor per layer (A in a B-round; unused in an A-round)
    device: torch.device | str | None = None
    num: dict[str, Tensor] = field(default_factory=dict)
    den: dict[str, Tensor] = field(default_factory=dict)
    clients: int = 0

    def add(self, trained: Mapping[str, Tensor], grams: Mapping[str, Tensor], projected: bool = False) -> None:
        """Fold in one client: trained factor and Gram (or, with ``projected``, A G A^T) per layer."""
        if set(trained) != set(self.shared) or not set(trained) <= set(grams):
            raise MergeError(
                f"client layers differ from the adapter's: {sorted(set(trained) ^ set(self.shared))[:3]}"
            )
        for name, t in trained.items():
            n, d = round_terms(self.factor, _f64(t, self.device), self.shared[name], grams[name], projected)
            self.num[name] = self.num[name] + n if name in self.num else n
            self.den[name] = self.den[name] + d if name in self.den else d
        self.clients += 1

    def solve(self, ridge: float = 0.0) -> dict[str, Tensor]:
        if not self.num:
            raise MergeError(f"{self.factor}-round merge with no client")
        return solve_layers(self.num, self.den, ridge)


def merge_round(
    factor: Factor,
    shared: Mapping[str, Tensor],
    trained: Iterable[Mapping[str, Tensor]],
    grams: Iterable[Mapping[str, Tensor]],
    ridge: float = 0.0,
    device: torch.device | str | None = None,
    projected: bool = False,
) -> dict[str, Tensor]:
    """The round's merged factor per layer from every client's trained factor and Grams (see ``RoundSums``)."""
    sums = RoundSums(factor, shared, device)
    for t, g in zip(trained, grams, strict=True):
        sums.add(t, g, projected)
    return sums.solve(ridge)


def head_from_sums(
    WG: Tensor, G: Tensor, nb: Tensor, n: float, ridge: float = 0.0
) -> tuple[Tensor, Tensor]:
    """RegMean of the clients' head blocks from sums over clients; bias averaged by sample count.

    WG = sum_i W_i G_i: (m, d); G = sum_i G_i: (d, d) or (d,) (the head's shrunk input Gram, alpha-head);
    nb = sum_i n_i b_i: (m,); n = sum_i n_i. Returns W* = WG pinv(G): (m, d) and b* = nb / n: (m,).
    """
    if not n > 0:
        raise MergeError(f"head merge needs a positive total sample count, got {n}")
    WG = _f64(WG)
    return solve_regmean(WG, _f64(G, WG.device), ridge), _f64(nb, WG.device) / n


class TaskSums:
    """Cross-task running sums per layer: S = sum_tau (B_tau A_tau) G_tau (d_out, d_in), H = sum_tau G_tau.

    The merged backbone is W0 + S pinv(H) (``delta``): RegMean over the task deltas. Memory is constant in the
    number of tasks. With diagonal Grams this is a column-wise average of the deltas weighted by each task's
    per-feature energy.
    """

    def __init__(self, S: dict[str, Tensor] | None = None, H: dict[str, Tensor] | None = None) -> None:
        self.S: dict[str, Tensor] = dict(S or {})
        self.H: dict[str, Tensor] = dict(H or {})

    def fold(self, A: Mapping[str, Tensor], B: Mapping[str, Tensor], G: Mapping[str, Tensor]) -> None:
        """Add one task: its merged adapter (A: (r, d_in), B: (d_out, r)) and its Gram summed over clients."""
        for name in A:
            g = _f64(G[name])
            term = times_gram(_f64(B[name], g.device) @ _f64(A[name], g.device), g)
            self.S[name] = self.S[name] + term if name in self.S else term
            self.H[name] = self.H[name] + g if name in self.H else g

    def delta(self, ridge: float = 0.0) -> dict[str, Tensor]:
        """S pinv(H) per layer: (d_out, d_in)."""
        return solve_layers(self.S, self.H, ridge)

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {"S": self.S, "H": self.H}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Mapping[str, Tensor]]) -> "TaskSums":
        return cls(dict(state["S"]), dict(state["H"]))


def delta_sum(
    adapters: Sequence[tuple[Mapping[str, Tensor], Mapping[str, Tensor]]],
    names: Iterable[str],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """sum_tau B_tau A_tau per layer: (d_out, d_in), for low-rank pairs (A: (r, d_in), B: (d_out, r))."""
    return {
        name: sum(b[name].to(device, dtype) @ a[name].to(device, dtype) for a, b in adapters)  # type: ignore[misc]
        for name in names
    }


def regmean_lowrank(
    AG: Mapping[str, Tensor], B: Mapping[str, Tensor], G: Mapping[str, Tensor], ridge: float = 0.0
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """RegMean of K clients' full deltas B_i A_i, returned exactly in low-rank form.

        dW* = (sum_i B_i A_i G_i) pinv(sum_i G_i) = [B_1 ... B_K] [A_1 G_1 H^+; ...; A_K G_K H^+]

    so dW* = B_stack A_stack with A_stack: (K r, d_in), B_stack: (d_out, K r): no d_out x d_in matrix is built
    or sent. Per layer: AG = [A_1 G_1; ...; A_K G_K]: (K r, d_in), B = [B_1 ... B_K]: (d_out, K r),
    G = sum_i G_i: (d_in,) or (d_in, d_in).
    """
    if not AG:
        raise MergeError("RegMean merge with no layer")
    A_stack = solve_layers({n: _f64(t) for n, t in AG.items()}, {n: _f64(G[n]) for n in AG}, ridge)
    return A_stack, {n: _f64(B[n]) for n in AG}
