"""Checks on one client's reply before it may enter a merge.

A reply that fails is dropped from the merge (the closed forms need only the replies they get), so every check
raises ``InvalidUpdate`` naming the client, the layer and the reason, for the server's log line.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

# A dense Gram is X^T X: symmetric, and its eigenvalues >= 0. Both are checked up to this relative tolerance
# (of the mean diagonal), which float32 transport and float64 accumulation stay far inside.
SYMMETRY_RTOL = 1e-5
PSD_RTOL = 1e-6
WIRE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class InvalidUpdate(ValueError):
    def __init__(self, client: str, layer: str, reason: str) -> None:
        super().__init__(f"client {client}, layer {layer}: {reason}")
        self.client, self.layer, self.reason = client, layer, reason


def _check_reply_tensor(client: str, name: str, t: object, shape: tuple[int, ...], what: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise InvalidUpdate(client, name, f"{what} is a {type(t).__name__}, not a tensor")
    if t.dtype not in WIRE_DTYPES:
        raise InvalidUpdate(client, name, f"{what} has dtype {t.dtype}, expected one of {WIRE_DTYPES}")
    if tuple(t.shape) != tuple(shape):
        raise InvalidUpdate(client, name, f"{what} shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not torch.isfinite(t).all():
        raise InvalidUpdate(client, name, f"{what} has NaN or Inf")
    return t


def check_gram(client: str, name: str, G: Tensor, wire_eps: float = 0.0) -> None:
    """A Gram statistic: diagonal (d,) with entries >= 0, or dense (d, d) symmetric positive semi-definite.

    ``wire_eps``: machine epsilon of the dtype G travelled in; rounding to it may move an eigenvalue of an honest
    (e.g. rank-deficient) Gram below zero by at most d * eps * max|G|, which the PSD check tolerates.
    """
    G = G.to(torch.float64)
    diag = G if G.ndim == 1 else G.diagonal()
    if (diag < 0).any():
        raise InvalidUpdate(client, name, f"Gram has a negative diagonal entry ({diag.min().item():.3g})")
    if G.ndim == 1:
        return
    scale = diag.mean().clamp(min=torch.finfo(torch.float64).tiny)
    asym = (G - G.T).abs().max()
    if asym > SYMMETRY_RTOL * scale:
        raise InvalidUpdate(client, name, f"dense Gram is not symmetric (max |G - G^T| = {asym.item():.3g})")
    # Cholesky of G + tol I succeeds iff every eigenvalue of G is > -tol: one factorisation, no eigensolver.
    tol = PSD_RTOL * scale + len(G) * wire_eps * G.abs().max()
    _, info = torch.linalg.cholesky_ex(G + tol * torch.eye(len(G), dtype=G.dtype, device=G.device))
    if info != 0:
        raise InvalidUpdate(client, name, "dense Gram is not positive semi-definite")


def validate_update(
    client: str,
    tensors: Mapping[str, object],
    grams: Mapping[str, object],
    num_examples: int,
    expected_shapes: Mapping[str, tuple[int, ...]],
    expected_gram_shapes: Mapping[str, tuple[int, ...]],
    wire_dtype: torch.dtype = torch.float64,
) -> None:
    """Raise InvalidUpdate unless the reply has exactly the expected layers, shapes, finite values and counts.

    tensors: trained factors and head block by name; grams: layer -> (d,) or (d, d), float;
    expected_*: the shapes the server's own model dictates; wire_dtype: the Grams' transport dtype.
    """
    if not isinstance(num_examples, int) or num_examples < 0:
        raise InvalidUpdate(client, "-", f"sample count {num_examples!r} is not a non-negative integer")
    for given, expected, what in ((tensors, expected_shapes, "tensor"), (grams, expected_gram_shapes, "Gram")):
        missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        if missing or extra:
            raise InvalidUpdate(client, (missing + extra)[0], f"{what} layers differ: missing {missing[:3]}, "
                                f"unexpected {extra[:3]}")
        for name, shape in expected.items():
            _check_reply_tensor(client, name, given[name], shape, what)
    for name, G in grams.items():
        check_gram(client, name, G, torch.finfo(wire_dtype).eps)  # type: ignore[arg-type]
    if num_examples == 0 and any(bool((G != 0).any()) for G in grams.values()):  # type: ignore[union-attr]
        raise InvalidUpdate(client, "-", "zero samples but non-zero Grams")
