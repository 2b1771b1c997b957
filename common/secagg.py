"""What a client contributes to a secure sum, and how the server reads the sum back: pure tensors, no Flower.

Under secure aggregation the server learns only sums over clients. Every method whose merges need nothing but
sums states its terms once (``Method.reply_spec(...).terms``, common/methods/): e.g. LoRM's round sends
num/<layer>, den/<layer> (A-round: A_i G_i, G_i; B-round: B_i P_i, P_i = A G_i A^T), head/WG, head/G, head/nb
(W_i G_i, G_i, n_i b_i) and count/n, count/nloss (n_i, n_i loss_i); a task end gram/<layer> and count/n.
Dense symmetric matrices travel as packed upper triangles (``common.wire``).

Fixed point. Flower's SecAgg+ sums integers: each value v must lie in [-c, c] and becomes one of T + 1 levels
(stochastic rounding, unbiased), so an entry too large is clipped and silently wrong. The statistics span many
orders of magnitude (a Gram grows with the client's sample count, a B-round's num with B), so no fixed range
fits them all. Every exchange therefore runs twice: a *probe*, where each client sends one row per array with a
1 in the bin of the power of two above that array's largest |entry| (a secure sum of one-hot rows: the server
learns how many clients fall in each bin, never which), then the *sum* of x / 2^e_a, where 2^e_a is the top
bin any client used. Values then lie in [-1, 1] (c = 1) and can never clip.

Error bound, per entry of a summed array: stochastic rounding moves each client's value by less than one level,
2/T in units of 2^e_a, so |sum - exact| < K * 2^(e_a + 1) / T for K clients. Since 2^e_a < 2 * max_i |x_i|,
that is below 4 K / T of the largest client's largest entry of that array (K = 10, T = 2^30: 4e-8). Small
entries of the same array get the same absolute error, hence a larger relative one; features whose summed
energy lies within that noise are treated as unseen (``drop_noise_features``), exactly like a zero feature.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from common.layout import Term
from common.wire import pack_symmetric, unpack_symmetric

# Exponent bins of the probe: the bin of e holds arrays with 2^(e-1) <= max|x| < 2^e (or smaller, in the
# lowest bin). 2^-64 is far below any statistic that matters; 2^63 is far above any float32 activation's.
EXP_LO, EXP_HI = -64, 64
NUM_BINS = EXP_HI - EXP_LO

# Keys of the orders' (legacy FitIns) config in secagg mode, shared by server and client.
PHASE, KIND, EXCHANGE, EXPONENTS = "lorm-secagg-phase", "lorm-kind", "lorm-exchange", "lorm-exponents"
PROBE, SUM = "probe", "sum"


class SecAggError(ValueError):
    """A contribution or a secure sum that cannot be used: out of range, wrong layout, not a valid statistic."""


# -- a client's terms as they travel -------------------------------------------------------------------------------
def wire_terms(terms: Mapping[str, Tensor], layout: Mapping[str, Term]) -> dict[str, Tensor]:
    """One client's terms (``Method.terms``) in their wire shapes: dense Grams as packed upper triangles."""
    if set(terms) != set(layout):
        raise SecAggError(f"terms {sorted(set(terms) ^ set(layout))[:3]} differ from the layout")
    return {key: pack_symmetric(t) if layout[key].wire_shape != layout[key].shape else t for key, t in terms.items()}


# -- fixed-point encoding --------------------------------------------------------------------------------------------
def top_exponent(t: Tensor) -> int | None:
    """The e with max|t| < 2^e (clamped below at EXP_LO); None for an all-zero array."""
    top = float(t.abs().max()) if t.numel() else 0.0
    if not math.isfinite(top):
        raise SecAggError("contribution has NaN or Inf")
    if top == 0.0:
        return None
    e = math.frexp(top)[1]  # top = m * 2^e with 0.5 <= m < 1
    if e >= EXP_HI:
        raise SecAggError(f"an entry of magnitude {top:.3g} is beyond the 2^{EXP_HI - 1} the encoding covers")
    return max(e, EXP_LO)


def probe(terms: Mapping[str, Tensor], keys: list[str]) -> np.ndarray:
    """(len(keys), NUM_BINS): a 1 in the bin of each array's top exponent (an all-zero row for a zero array)."""
    rows = np.zeros((len(keys), NUM_BINS))
    for i, key in enumerate(keys):
        e = top_exponent(terms[key])
        if e is not None:
            rows[i, e - EXP_LO] = 1.0
    return rows


def exponents_from_probe(summed: np.ndarray, keys: list[str]) -> dict[str, int]:
    """The top bin any client used, per array (0 for an array every client left at zero)."""
    if summed.shape != (len(keys), NUM_BINS):
        raise SecAggError(f"probe sum has shape {summed.shape}, expected {(len(keys), NUM_BINS)}")
    out = {}
    for key, row in zip(keys, summed):
        used = np.flatnonzero(row > 0.5)  # counts are integers; the sum's rounding error is far below 0.5
        out[key] = int(used[-1]) + EXP_LO if used.size else 0
    return out


def encode(terms: Mapping[str, Tensor], exponents: Mapping[str, int], keys: list[str]) -> list[np.ndarray]:
    """x / 2^e per array, float64, each in [-1, 1] by construction (else SecAggError: the probe was not ours)."""
    out = []
    for key in keys:
        v = terms[key].detach().to(torch.float64).cpu().numpy() * 2.0 ** -exponents[key]
        if v.size and not np.abs(v).max() <= 1.0:
            raise SecAggError(f"{key}: |value| {np.abs(v).max():.3g} x 2^{exponents[key]} exceeds the agreed range")
        out.append(v)
    return out


def decode(
    sums: list[np.ndarray], exponents: Mapping[str, int], layout: Mapping[str, tuple[int, ...]]
) -> dict[str, Tensor]:
    """The summed arrays, back in their units; SecAggError if they do not match the layout (keys sorted)."""
    keys = sorted(layout)
    if len(sums) != len(keys):
        raise SecAggError(f"secure sum has {len(sums)} arrays, the layout {len(keys)}")
    out = {}
    for key, s in zip(keys, sums):
        if tuple(s.shape) != tuple(layout[key]):
            raise SecAggError(f"{key}: summed shape {tuple(s.shape)}, expected {tuple(layout[key])}")
        out[key] = torch.from_numpy(np.asarray(s, dtype=np.float64) * 2.0 ** exponents[key])
    return out


def error_bound(exponent: int, clients: int, quantization_range: int) -> float:
    """Largest absolute error of one summed entry (see the module docstring)."""
    return clients * 2.0 ** (exponent + 1) / quantization_range


# -- reading a sum ---------------------------------------------------------------------------------------------------
def read_sum(summed: Mapping[str, Tensor], layout: Mapping[str, Term], bounds: Mapping[str, float]) -> dict[str, Tensor]:
    """The summed terms in their own shapes, checked and cleaned of quantisation noise.

    Every Gram term must be a Gram (``check_gram_sum``, up to its error bound); the features of a Gram whose
    summed energy lies within the noise are treated as unseen in it and in the numerators ``over`` it
    (``drop_noise_features``). SecAggError names the first term that fails.
    """
    out = {key: _full(t, layout[key]) for key, t in summed.items()}
    for key, term in layout.items():
        if term.gram:
            check_gram_sum(key, out[key], bounds[key])
    for key, term in layout.items():
        if term.over:
            out[key], out[term.over] = drop_noise_features(out[key], out[term.over], bounds[term.over])
    return out


def _full(t: Tensor, term: Term) -> Tensor:
    """A packed upper triangle (``decode`` checked its length) as its symmetric matrix, where it travelled so."""
    return t if term.wire_shape == term.shape else unpack_symmetric(t, term.shape[0])


def drop_noise_features(num: Tensor, den: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """Zero the features whose summed energy (diagonal of den) is within the quantisation noise ``floor``.

    The merge divides by that energy, so a feature seen by no one (exactly 0 in plain mode) would otherwise
    become noise / noise; zeroing it gives the merge's exact answer for an unseen feature (a zero column).
    """
    diag = den if den.ndim == 1 else den.diagonal()
    keep = diag > floor
    if bool(keep.all()):
        return num, den
    num = num * keep
    den = den * keep if den.ndim == 1 else den * (keep[:, None] & keep[None, :])
    return num, den


def check_gram_sum(name: str, G: Tensor, tol: float) -> None:
    """A sum of Grams is a Gram: finite, diagonal >= 0, dense ones PSD, each up to the quantisation noise ``tol``
    per entry (a dense d x d noise matrix moves eigenvalues by at most d * tol)."""
    if not torch.isfinite(G).all():
        raise SecAggError(f"{name}: summed Gram has NaN or Inf")
    diag = G if G.ndim == 1 else G.diagonal()
    if (diag < -tol).any():
        raise SecAggError(f"{name}: summed Gram has a negative diagonal entry ({diag.min().item():.3g})")
    if G.ndim == 2:
        slack = (len(G) + 1) * tol
        _, info = torch.linalg.cholesky_ex(G + slack * torch.eye(len(G), dtype=G.dtype))
        if info != 0:
            raise SecAggError(f"{name}: summed Gram is not positive semi-definite")
