"""Closed-form LoRM merges as pure tensor functions (placeholder by the lead until the merges module lands)."""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch
from torch import Tensor


def _f64(t: Tensor, device=None) -> Tensor:
    return t.to(device=device, dtype=torch.float64)


def solve_regmean(num: Tensor, den: Tensor, ridge: float = 0.0) -> Tensor:
    """num @ den^+ ; num: (..., m, d); den: (..., d) diagonal or (..., d, d) dense."""
    if den.ndim == num.ndim - 1:  # diagonal
        safe = torch.where(den > 0, den, torch.ones_like(den))
        return torch.where(den.unsqueeze(-2) > 0, num / safe.unsqueeze(-2), torch.zeros_like(num))
    d = den.shape[-1]
    lam = ridge * torch.diagonal(den, dim1=-2, dim2=-1).mean(-1)
    den = den + lam[..., None, None] * torch.eye(d, dtype=den.dtype, device=den.device)
    L, info = torch.linalg.cholesky_ex(den)
    out = torch.cholesky_solve(num.transpose(-1, -2), L).transpose(-1, -2)
    bad = info != 0
    if bad.any():
        out[bad] = num[bad] @ torch.linalg.pinv(den[bad], hermitian=True)
    return out


def _times_gram(W: Tensor, G: Tensor) -> Tensor:
    return W * G.unsqueeze(-2) if G.ndim == W.ndim - 1 else W @ G


def merge_round_layers(
    mode: Literal["A", "B"], shared: dict[str, Tensor], factors: list[dict[str, Tensor]],
    grams: list[dict[str, Tensor]], ridge: float = 0.0, device=None,
) -> dict[str, Tensor]:
    out = {}
    for name in factors[0]:
        F = torch.stack([_f64(f[name], device) for f in factors])
        G = torch.stack([_f64(g[name], device) for g in grams])
        if mode == "A":
            out[name] = solve_regmean(_times_gram(F, G).sum(0), G.sum(0), ridge)
        else:
            A = _f64(shared[name], device)
            AG = _times_gram(A.expand(len(factors), *A.shape), G)  # (K, r, d)
            P = AG @ A.T  # (K, r, r)
            out[name] = solve_regmean((F @ P).sum(0), P.sum(0), ridge)
    return out


def merge_head(Ws: Tensor, bs: Tensor, Gs: Tensor, counts: Tensor, ridge: float = 0.0) -> tuple[Tensor, Tensor]:
    Ws, bs, Gs, counts = _f64(Ws), _f64(bs), _f64(Gs), _f64(counts)
    W = solve_regmean(_times_gram(Ws, Gs).sum(0), Gs.sum(0), ridge)
    total = counts.sum()
    b = (bs * counts[:, None]).sum(0) / total if total > 0 else bs.mean(0)
    return W, b


class TaskSums:
    def __init__(self) -> None:
        self.S: dict[str, Tensor] = {}
        self.H: dict[str, Tensor] = {}

    def fold(self, A: dict[str, Tensor], B: dict[str, Tensor], G: dict[str, Tensor]) -> None:
        for name in A:
            g = _f64(G[name])
            delta = _f64(B[name]) @ _f64(A[name])
            self.S[name] = self.S.get(name, 0) + _times_gram(delta, g)
            self.H[name] = self.H.get(name, 0) + g

    def delta(self, ridge: float = 0.0) -> dict[str, Tensor]:
        return {name: solve_regmean(self.S[name], self.H[name], ridge) for name in self.S}

    def state_dict(self) -> dict:
        return {"S": self.S, "H": self.H}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TaskSums":
        sums = cls()
        sums.S, sums.H = dict(state["S"]), dict(state["H"])
        return sums


__all__ = ["solve_regmean", "merge_round_layers", "merge_head", "TaskSums", "defaultdict"]
