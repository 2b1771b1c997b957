"""Input Gram statistics G = X^T X of adapted layers (and the head), collected with forward pre-hooks.

X: (n_rows, d_in) stacks every row a layer sees: every token for a Linear, every pixel position for a 1x1
conv. With alpha == 0 only diag(G) is ever used, so only it is accumulated (O(d_in) memory, never a dense
matrix); alpha > 0 accumulates the dense (d_in, d_in) matrix. Sums are float64 (millions of rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from common.lora import layer_kind, weight_matrix

# Rows are cast to float64 in chunks of at most this many elements (32 MiB), to bound the extra memory.
_CHUNK_ELEMENTS = 1 << 22


class GramError(ValueError):
    """Bad Gram request: alpha outside [0, 1] or not matching the layers."""


def _check_alpha(name: str, alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise GramError(f"layer {name!r}: shrinkage alpha must be in [0, 1], got {alpha}")


def shrink(G: Tensor, alpha: float) -> Tensor:
    """alpha * G + (1 - alpha) * diag(G) for G: (..., d, d); alpha == 0 returns the diagonal vector (..., d)."""
    _check_alpha("", alpha)
    diag = G.diagonal(dim1=-2, dim2=-1)
    if alpha == 0.0:
        return diag.clone()
    return alpha * G + (1.0 - alpha) * torch.diag_embed(diag)


def low_rank_pays(rows: int, side: int) -> bool:
    """Whether a (side, rows) factor is smaller than the packed triangle of a side x side Gram."""
    return 2 * rows < side + 1


def low_rank_factor(G: Tensor, alpha: float) -> Tensor | None:
    """F: (d, k) with shrink(F F^T, alpha) == G to float64 rounding, where G: (d, d) is a shrunk Gram, alpha > 0.

    Shrinking keeps the diagonal and scales the rest by alpha, so the raw X^T X is (G - D) / alpha + D; its rank
    is at most the number of rows a client saw, which for the head (one row per image) is often below d. F keeps
    the eigenvalues above rank tolerance (d * eps * the largest, numpy's matrix_rank rule), so nothing is lost
    that float64 could represent. Returns None when the packed triangle is no larger (``low_rank_pays``), when
    k = 0, or when the eigensolver does not converge: the caller then sends the packed triangle, also exact.
    """
    _check_alpha("", alpha)
    if alpha == 0.0 or G.ndim != 2:
        raise GramError("a low-rank factor needs a dense Gram shrunk with alpha > 0")
    G = G.to(torch.float64)
    d = G.shape[-1]
    D = torch.diag_embed(G.diagonal())
    try:
        values, vectors = torch.linalg.eigh((G - D) / alpha + D)
    except torch.linalg.LinAlgError:  # LAPACK did not converge (badly scaled features): the packed form is exact
        return None
    keep = values > values[-1].clamp(min=0) * d * torch.finfo(torch.float64).eps
    rank = int(keep.sum())
    if rank == 0 or not low_rank_pays(rank, d):  # an all-zero Gram travels packed: no (d, 0) arrays on the wire
        return None
    factor = vectors[:, keep] * values[keep].sqrt()
    # A feature no sample activated must stay exactly zero: the merges treat a zero diagonal as "unseen" and
    # solve around it, while the eigenvectors' rounding would leave ~1e-30 there, a near-singular system.
    factor[G.diagonal() == 0] = 0
    return factor


@dataclass
class GramStats:
    """Running float64 sums per layer: diag(X^T X): (d_in,) where alpha == 0, else X^T X: (d_in, d_in)."""

    alpha: dict[str, float]
    sums: dict[str, Tensor]
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, X: Tensor) -> None:
        """Accumulate rows X: (n, d_in) into layer ``name``."""
        acc = self.sums[name]
        for chunk in X.detach().split(max(1, _CHUNK_ELEMENTS // X.shape[1])):
            chunk = chunk.to(acc.device, torch.float64)
            acc += (chunk * chunk).sum(dim=0) if acc.ndim == 1 else chunk.T @ chunk
        self.counts[name] = self.counts.get(name, 0) + X.shape[0]

    @property
    def grams(self) -> dict[str, Tensor]:
        """Shrunk Grams, float64: (d_in,) for alpha == 0, (d_in, d_in) otherwise (zeros if a layer saw nothing)."""
        return {name: s.clone() if s.ndim == 1 else shrink(s, self.alpha[name]) for name, s in self.sums.items()}

    @property
    def rows(self) -> dict[str, int]:
        """Number of rows (tokens / pixel positions) each layer saw."""
        return {name: self.counts.get(name, 0) for name in self.sums}


def _hook(stats: GramStats, name: str, rows_of: Callable[[Tensor], Tensor], module: nn.Module, args: tuple) -> None:
    stats.add(name, rows_of(args[0]))


@contextmanager
def collect_grams(modules: Mapping[str, nn.Module], alpha: Mapping[str, float]) -> Iterator[GramStats]:
    """Within the block, every forward of ``modules[name]`` adds its input rows to the Gram of ``name``.

    ``modules``: peft LoRA layer, nn.Linear or 1x1 nn.Conv2d by name; ``alpha``: shrinkage per name (same names).
    The hooks are removed on exit, also on an exception; the returned stats stay readable afterwards.
    """
    missing = [n for n in modules if n not in alpha]
    extra = [n for n in alpha if n not in modules]
    if missing or extra:
        raise GramError(f"alpha and modules name different layers: no alpha for {missing}, no module for {extra}")
    sums = {}
    for name, module in modules.items():
        _check_alpha(name, alpha[name])
        w = weight_matrix(module, name)
        d_in = w.shape[1]
        shape = (d_in,) if alpha[name] == 0.0 else (d_in, d_in)
        sums[name] = torch.zeros(shape, dtype=torch.float64, device=w.device)
    stats = GramStats(alpha=dict(alpha), sums=sums)
    handles = [
        module.register_forward_pre_hook(partial(_hook, stats, name, layer_kind(module, name).rows))
        for name, module in modules.items()
    ]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
