"""How named tensors are laid out for transport: key prefixes, transport dtype and packed symmetric matrices.

Flower moves flat ``str -> array`` records; these helpers turn the app's nested dicts into such flat dicts and
back. Dense Grams are symmetric, so only their upper triangle travels (d(d+1)/2 numbers instead of d^2).
"""

from __future__ import annotations

import torch
from torch import Tensor

_SEP = "/"


def flatten(prefix: str, tensors: dict[str, Tensor], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """{"layer": t} -> {"prefix/layer": t} (optionally cast, always contiguous CPU for serialisation)."""
    return {f"{prefix}{_SEP}{name}": _cpu(t, dtype) for name, t in tensors.items()}


def unflatten(prefix: str, flat: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`flatten`: the entries under ``prefix``, with the prefix removed."""
    head = f"{prefix}{_SEP}"
    return {key[len(head):]: t for key, t in flat.items() if key.startswith(head)}


def nbytes(tensors: dict[str, Tensor]) -> int:
    """Bytes of the tensors' data, as they travel."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _cpu(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    t = t.detach()
    if dtype is not None:
        t = t.to(dtype)
    return t.cpu().contiguous()


def pack_symmetric(g: Tensor) -> Tensor:
    """(d, d) symmetric -> (d(d+1)/2,) upper triangle, row-major."""
    d = g.shape[-1]
    iu = torch.triu_indices(d, d, device=g.device)
    return g[iu[0], iu[1]]


def unpack_symmetric(packed: Tensor, d: int) -> Tensor:
    """(d(d+1)/2,) -> (d, d); raises if the length does not belong to a d x d triangle."""
    expected = d * (d + 1) // 2
    if packed.ndim != 1 or packed.numel() != expected:
        raise ValueError(f"packed symmetric matrix for d={d} needs {expected} numbers, got shape {tuple(packed.shape)}")
    iu = torch.triu_indices(d, d, device=packed.device)
    out = packed.new_zeros(d, d)
    out[iu[0], iu[1]] = packed
    out[iu[1], iu[0]] = packed
    return out
