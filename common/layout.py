"""The layout of every reply, stated once: its tensors, its Gram statistics and their forms, the terms it adds to
a sum over clients, and the largest size a valid one can have.

A ``ReplySpec`` is built by the run's method (``Method.reply_spec``) from the model's ``Dims``; every reader
takes it from there: the client (which Grams to project before encoding), the server's validation (the
expected shapes) and its size cap, secure aggregation (the terms and their wire shapes) and bench/payloads.py.

Shapes, for an adapted layer W0: (d_out, d_in), rank r, a head of d inputs and a task block of m classes:
    factors   "A:<layer>" (r, d_in), "B:<layer>" (d_out, r)
    head      "head.weight" (m, d), "head.bias" (m,)
    head sums "class_sums" (m, d) and the head's DENSE Gram (d, d), of the head inputs through W0 (head-sums query)
    Grams     DIAGONAL (d_in,) where the shrinkage alpha is 0; DENSE (d_in, d_in) where it is > 0 (travels as a
              packed triangle or an exact low-rank factor, common/protocol.py); PROJECTED (r, r): A G A^T
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from common.model import HEAD

TRAIN = "train"  # Flower message type of a round's order
GRAMS = "query.grams"  # Flower message type of a task end's Gram query
HEAD_SUMS = "query.head"  # Flower message type of a task end's head-sums query (head = "analytic")
CLASS_SUMS = "class_sums"  # a head-sums reply's Y^T X of the task's classes: (m, d), row c sums class lo + c's inputs
CHECK = "query.check"  # Flower message type of the start-up check (common/protocol.py: CHECK_ORDER)


class GramForm(Enum):
    DIAGONAL = "diagonal"
    DENSE = "dense"
    PROJECTED = "projected"


@dataclass(frozen=True)
class GramSlot:
    """One layer's Gram in a reply: its form and side (d_in, or r when projected)."""

    form: GramForm
    side: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.side,) if self.form is GramForm.DIAGONAL else (self.side, self.side)


@dataclass(frozen=True)
class Term:
    """One array a client adds to a reduction over clients.

    ``gram``: a Gram (or a sum of them): checked as one (diagonal >= 0, dense ones PSD); a dense one travels as
    its packed upper triangle in secure mode. ``over``: for a numerator, the Gram term whose unseen features (zero
    energy) zero its columns. ``stack``: concatenated over clients along this dimension instead of summed (a
    merge that needs every client's part; secure aggregation, which only sums, cannot carry it).
    """

    shape: tuple[int, ...]
    gram: bool = False
    over: str = ""
    stack: int | None = None

    @property
    def wire_shape(self) -> tuple[int, ...]:
        if self.gram and len(self.shape) == 2:
            d = self.shape[0]
            return (d * (d + 1) // 2,)
        return self.shape


@dataclass(frozen=True)
class Dims:
    """The model's sizes a layout depends on."""

    shapes: Mapping[str, tuple[int, int]]  # adapted layer -> (d_out, d_in)
    rank: int
    head_in: int  # d, the head's input features
    dense: Mapping[str, bool]  # layer (or HEAD) -> its Gram is a full matrix (shrinkage alpha > 0)

    def gram(self, name: str, projected: bool = False) -> GramSlot:
        if projected:
            return GramSlot(GramForm.PROJECTED, self.rank)
        side = self.head_in if name == HEAD else self.shapes[name][1]
        return GramSlot(GramForm.DENSE if self.dense[name] else GramForm.DIAGONAL, side)

    def factor_shape(self, factor: str, layer: str) -> tuple[int, int]:
        d_out, d_in = self.shapes[layer]
        return (self.rank, d_in) if factor == "A" else (d_out, self.rank)


@dataclass(frozen=True)
class ReplySpec:
    """What one valid reply holds. ``factor``: the factors trained ("A", "B", "AB"), "" at a task end."""

    kind: str
    factor: str
    tensors: dict[str, tuple[int, ...]]  # trained factors ("A:<layer>") and the head block
    grams: dict[str, GramSlot]
    terms: dict[str, Term] = field(default_factory=dict)

    @property
    def projected(self) -> frozenset[str]:
        return frozenset(name for name, g in self.grams.items() if g.form is GramForm.PROJECTED)

    @property
    def gram_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: g.shape for name, g in self.grams.items()}

    @property
    def summable(self) -> bool:
        """Every term is a plain sum over clients (what secure aggregation can carry)."""
        return all(t.stack is None for t in self.terms.values())

    @property
    def max_bytes(self) -> int:
        """A valid reply's arrays at float64 (dense Grams as packed triangles), plus room for the keys."""
        numbers = sum(math.prod(s) for s in self.tensors.values())
        numbers += sum(g.side if g.form is GramForm.DIAGONAL else g.side * (g.side + 1) // 2 for g in self.grams.values())
        return 8 * numbers + 256 * (len(self.tensors) + len(self.grams)) + 4096

    @property
    def wire_layout(self) -> dict[str, tuple[int, ...]]:
        """The terms' shapes as secure aggregation moves them."""
        return {key: t.wire_shape for key, t in self.terms.items()}
