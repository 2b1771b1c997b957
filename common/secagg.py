"""What a client contributes to a secure sum, and how the server reads the sum back: pure tensors, no Flower.

Under secure aggregation the server learns only sums over clients, so every merge input is sent as a
client-side product that adds up (see common/merges.py: the merges need nothing but sums):

    round     num/<layer>, den/<layer>   ``round_terms`` (A-round: A_i G_i, G_i; B-round: B_i P_i, P_i = A G_i A^T)
              head/WG, head/G, head/nb   W_i G_i, G_i (alpha-head shrunk), n_i b_i   (the head block)
              count/n, count/nloss       n_i, n_i * loss_i
    task end  gram/<layer>, count/n      G_i through W0 + mean of the task deltas, n_i

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

from common.merges import round_terms, times_gram
from common.wire import pack_symmetric, unpack_symmetric

# Exponent bins of the probe: the bin of e holds arrays with 2^(e-1) <= max|x| < 2^e (or smaller, in the
# lowest bin). 2^-64 is far below any statistic that matters; 2^63 is far above any float32 activation's.
EXP_LO, EXP_HI = -64, 64
NUM_BINS = EXP_HI - EXP_LO
HEAD_KEYS = ("head/WG", "head/G", "head/nb")
COUNT_N, COUNT_NLOSS = "count/n", "count/nloss"

# Keys of the orders' (legacy FitIns) config in secagg mode, shared by server and client.
PHASE, KIND, EXCHANGE, EXPONENTS = "lorm-secagg-phase", "lorm-kind", "lorm-exchange", "lorm-exponents"
PROBE, SUM = "probe", "sum"


class SecAggError(ValueError):
    """A contribution or a secure sum that cannot be used: out of range, wrong layout, not a valid statistic."""


# -- layouts: the arrays of one exchange, by name, in the shape they travel ------------------------------------------
def round_layout(
    shapes: Mapping[str, tuple[int, int]], rank: int, factor: str, head_rows: int, head_d: int,
    dense: Mapping[str, bool],
) -> dict[str, tuple[int, ...]]:
    """Wire shapes of a round's terms. dense[name]: the layer's (or "head"'s) Gram is a full matrix."""
    out: dict[str, tuple[int, ...]] = {}
    for name, (d_out, d_in) in shapes.items():
        if factor == "B":
            out[f"num/{name}"], out[f"den/{name}"] = (d_out, rank), (rank * (rank + 1) // 2,)
        else:
            out[f"num/{name}"], out[f"den/{name}"] = (rank, d_in), _gram_shape(d_in, dense[name])
    out["head/WG"], out["head/nb"] = (head_rows, head_d), (head_rows,)
    out["head/G"] = _gram_shape(head_d, dense["head"])
    out[COUNT_N], out[COUNT_NLOSS] = (1,), (1,)
    return out


def task_end_layout(shapes: Mapping[str, tuple[int, int]], dense: Mapping[str, bool]) -> dict[str, tuple[int, ...]]:
    return {f"gram/{name}": _gram_shape(d_in, dense[name]) for name, (_, d_in) in shapes.items()} | {COUNT_N: (1,)}


def _gram_shape(d: int, dense: bool) -> tuple[int, ...]:
    return (d * (d + 1) // 2,) if dense else (d,)


def _packed(t: Tensor) -> Tensor:
    return pack_symmetric(t) if t.ndim == 2 else t


# -- a client's contribution -----------------------------------------------------------------------------------------
def round_contribution(
    factor: str, trained: Mapping[str, Tensor], shared: Mapping[str, Tensor], grams: Mapping[str, Tensor],
    head_weight: Tensor, head_bias: Tensor, num_examples: int, train_loss: float,
) -> dict[str, Tensor]:
    """One client's round terms (float64, wire shapes). grams: per layer G_i (A-round) or A G_i A^T (B-round),
    plus "head"."""
    out: dict[str, Tensor] = {}
    for name, t in trained.items():
        num, den = round_terms(factor, t, shared[name], grams[name], projected=factor == "B")  # type: ignore[arg-type]
        out[f"num/{name}"], out[f"den/{name}"] = num, _packed(den)
    G = grams["head"].to(torch.float64)
    n = float(num_examples)
    out["head/WG"] = times_gram(head_weight.to(torch.float64), G)
    out["head/G"] = _packed(G)
    out["head/nb"] = head_bias.to(torch.float64) * n
    out[COUNT_N] = torch.tensor([n], dtype=torch.float64)
    # A client with no samples reports loss NaN; it weighs nothing, so it adds 0.
    out[COUNT_NLOSS] = torch.tensor([n * train_loss if n else 0.0], dtype=torch.float64)
    return out


def task_end_contribution(grams: Mapping[str, Tensor], num_examples: int) -> dict[str, Tensor]:
    out = {f"gram/{name}": _packed(g.to(torch.float64)) for name, g in grams.items()}
    return out | {COUNT_N: torch.tensor([float(num_examples)], dtype=torch.float64)}


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
def unpack(summed: Mapping[str, Tensor], prefix: str, dense: Mapping[str, bool]) -> dict[str, Tensor]:
    """{layer: tensor} for the arrays under ``prefix``; those named in ``dense`` come back as full matrices."""
    return {
        key[len(prefix):]: full(t, dense.get(key[len(prefix):], False))
        for key, t in summed.items() if key.startswith(prefix)
    }


def full(t: Tensor, dense: bool) -> Tensor:
    """A packed upper triangle as its symmetric matrix (when ``dense``), else ``t`` as it is."""
    return unpack_symmetric(t, _side(t.numel())) if dense else t


def _side(packed: int) -> int:
    d = int((math.isqrt(8 * packed + 1) - 1) // 2)
    if d * (d + 1) // 2 != packed:
        raise SecAggError(f"{packed} numbers are not the upper triangle of a square matrix")
    return d


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
