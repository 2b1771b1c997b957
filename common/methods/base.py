"""What a federated method is, and the registry of methods.

A method states, in its own module, everything the rest of the app asks of it:
- ``schedule``: which factors each round of a task trains ("B", "A", "AB");
- ``cross_tasks``: the cross-task rules it supports (the run's ``cross-task``), which fix what clients train on
  and pass their Grams through (``past_mode``);
- ``round_layout`` / ``backbone_terms``: what a client adds to the round's reduction over clients, per layer;
- ``merge_backbone``: the server merge, a pure function from the reduced terms to new tensors;
- ``end_task`` / ``eval_deltas``: what a finished task leaves behind, and the backbone delta evaluated.

The head block, the sample count, the loss and the analytic head's task-end sums (HEAD_SUMS, head = "analytic")
are the same for every method and handled here. Register a method
with ``@register_method``; nothing else in the app names one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from common.layout import CLASS_SUMS, GRAMS, HEAD_SUMS, TRAIN, Dims, GramForm, GramSlot, ReplySpec, Term
from common.merges import MergeError, TaskSums, delta_sum, head_from_sums, times_gram
from common.model import HEAD
from common.protocol import ClientReply, RoundOrder

Adapter = tuple[dict[str, Tensor], dict[str, Tensor]]  # (A: layer -> (r, d_in), B: layer -> (d_out, r))
# "mean": clients train on W0 and pass Grams through W0 + the mean of the past and current task deltas;
# "sum": clients train, and pass Grams, through W0 + the sum of the past deltas.
PastMode = Literal["mean", "sum"]
# Across tasks, "mean": every task trains on W0 and the model is W0 + a mean of the task deltas (LoRM's is the
# Gram-weighted S H^+); "chain": every task trains on W0 + the sum of the past deltas, and the model is that sum.
CrossTaskRule = Literal["mean", "chain"]
COUNT_N, COUNT_NLOSS = "count/n", "count/nloss"


@dataclass(frozen=True)
class RoundUpdate:
    """A round's merge: the new factors (absent ones stay), the task's head block, and optionally a finished
    delta that joins the past (the next round then starts from a fresh adapter)."""

    factors: dict[str, dict[str, Tensor]]
    head_weight: Tensor  # (m, d)
    head_bias: Tensor  # (m,)
    finished: Adapter | None = None


@dataclass
class CrossTask:
    """What the finished tasks leave: the deltas clients need (``past``) and the running Gram sums (LoRM)."""

    past: list[Adapter] = field(default_factory=list)
    sums: TaskSums = field(default_factory=TaskSums)


class Method(ABC):
    name: ClassVar[str]
    cross_tasks: ClassVar[tuple[CrossTaskRule, ...]]  # the rules it supports; the first is its default
    round_grams: ClassVar[bool]  # replies carry input Grams; the head is then merged by RegMean, else averaged
    task_end_grams: ClassVar[bool] = False  # a Gram query at each task end, handed to ``end_task``

    def __init__(self, cross_task: str = "") -> None:
        """``cross_task``: one of ``cross_tasks``, or "" for the method's default."""
        rule = cross_task or self.cross_tasks[0]
        if rule not in self.cross_tasks:
            raise ValueError(f"cross-task {cross_task!r} is not a rule of {self.name} (it has {list(self.cross_tasks)})")
        self.cross_task: CrossTaskRule = rule  # type: ignore[assignment]

    @property
    def past_mode(self) -> PastMode:
        return "sum" if self.cross_task == "chain" else "mean"

    @abstractmethod
    def schedule(self, rounds: int) -> list[str]:
        """The factors trained in each of a task's rounds."""

    def projects(self, factor: str) -> bool:
        """Whether this round's replies carry A G A^T instead of the layers' Grams."""
        return False

    @property
    def summable(self) -> bool:
        """Every round's terms are plain sums over clients (what secure aggregation can carry)."""
        dims = Dims({"layer": (2, 2)}, 1, 2, {"layer": False, HEAD: False})
        return all(self.reply_spec(TRAIN, f, dims, 1).summable for f in set(self.schedule(2)))

    # -- what a reply holds --------------------------------------------------------------------------------------
    @abstractmethod
    def round_layout(self, factor: str, dims: Dims) -> dict[str, Term]:
        """The backbone terms of a round, per layer."""

    @abstractmethod
    def backbone_terms(self, factor: str, reply: ClientReply, shared: Adapter) -> dict[str, Tensor]:
        """One client's backbone terms (float64), as ``round_layout`` states them; ``shared``: the order's (A, B)."""

    def reply_spec(self, kind: str, factor: str, dims: Dims, head_rows: int) -> ReplySpec:
        """The layout of a reply to a round order (``kind`` TRAIN), a task-end Gram query (GRAMS) or a task-end
        head-sums query (HEAD_SUMS: the analytic head's sums, common/analytic.py, the same for every method)."""
        if kind == HEAD_SUMS:
            gram = GramSlot(GramForm.DENSE, dims.head_in)  # X^T X, raw (no shrinkage): the ridge regularises
            sums = (head_rows, dims.head_in)
            terms = {f"gram/{HEAD}": Term(gram.shape, gram=True), CLASS_SUMS: Term(sums), COUNT_N: Term((1,))}
            return ReplySpec(kind, "", {CLASS_SUMS: sums}, {HEAD: gram}, terms)
        if kind == GRAMS:
            grams = {name: dims.gram(name) for name in dims.shapes}
            terms = {f"gram/{name}": Term(g.shape, gram=True) for name, g in grams.items()}
            return ReplySpec(kind, "", {}, grams, terms | {COUNT_N: Term((1,))})
        if kind != TRAIN:
            raise ValueError(f"unknown message type {kind!r}")
        tensors = {f"{f}:{name}": dims.factor_shape(f, name) for f in factor for name in dims.shapes}
        tensors |= {"head.weight": (head_rows, dims.head_in), "head.bias": (head_rows,)}
        grams = {}
        if self.round_grams:
            grams = {name: dims.gram(name, self.projects(factor)) for name in dims.shapes} | {HEAD: dims.gram(HEAD)}
        head = {"head/nb": Term((head_rows,))}
        if self.round_grams:
            head |= {"head/WG": Term((head_rows, dims.head_in), over="head/G"),
                     "head/G": Term(dims.gram(HEAD).shape, gram=True)}
        else:
            head |= {"head/nW": Term((head_rows, dims.head_in))}
        counts = {COUNT_N: Term((1,)), COUNT_NLOSS: Term((1,))}
        return ReplySpec(kind, factor, tensors, grams, self.round_layout(factor, dims) | head | counts)

    def terms(self, order: RoundOrder, reply: ClientReply) -> dict[str, Tensor]:
        """Everything one client adds to the reduction (float64, shapes as ``reply_spec`` states them)."""
        n = float(reply.num_examples)
        count = {COUNT_N: torch.tensor([n], dtype=torch.float64)}
        if not order.factor:  # a task end: the Grams asked for, and the class sums of a head-sums reply
            grams = {f"gram/{name}": g.to(torch.float64) for name, g in reply.grams.items()}
            sums = {} if reply.class_sums is None else {CLASS_SUMS: reply.class_sums.to(torch.float64)}
            return grams | sums | count
        assert reply.head_weight is not None and reply.head_bias is not None  # validated: a round reply has them
        W, b = reply.head_weight.to(torch.float64), reply.head_bias.to(torch.float64)
        out = self.backbone_terms(order.factor, reply, (order.A, order.B)) | {"head/nb": b * n}
        if self.round_grams:
            G = reply.grams[HEAD].to(torch.float64)
            out |= {"head/WG": times_gram(W, G), "head/G": G}
        else:
            out |= {"head/nW": W * n}
        # A client with no samples reports loss NaN; it weighs nothing, so it adds 0.
        nloss = n * reply.train_loss if n else 0.0
        return out | count | {COUNT_NLOSS: torch.tensor([nloss], dtype=torch.float64)}

    # -- the server's side ---------------------------------------------------------------------------------------
    @abstractmethod
    def merge_backbone(
        self, factor: str, sums: Mapping[str, Tensor], adapter: Adapter, ridge: float
    ) -> tuple[dict[str, dict[str, Tensor]], Adapter | None]:
        """(new factors by name, a finished delta or None) from the round's reduced terms."""

    def merge_round(self, factor: str, sums: Mapping[str, Tensor], adapter: Adapter, ridge: float) -> RoundUpdate:
        n = float(sums[COUNT_N].item())
        if not n > 0:
            raise MergeError(f"the round's replies hold {n:g} samples")
        if self.round_grams:
            W, b = head_from_sums(sums["head/WG"], sums["head/G"], sums["head/nb"], n, ridge)
        else:
            W, b = sums["head/nW"] / n, sums["head/nb"] / n
        factors, finished = self.merge_backbone(factor, sums, adapter, ridge)
        return RoundUpdate(factors, W, b, finished)

    def end_task(self, adapter: Adapter, cross: CrossTask, grams: Mapping[str, Tensor] | None) -> CrossTask:
        """The task's merged adapter joins the past (``grams``: the task-end Gram sums, if the method asks)."""
        return CrossTask(cross.past + [adapter], cross.sums)

    def eval_deltas(self, cross: CrossTask, layers: list[str], ridge: float) -> dict[str, Tensor]:
        """The backbone delta evaluated after a task: the sum ("chain") or the mean ("mean") of the past deltas
        (float64, (d_out, d_in))."""
        total = delta_sum(cross.past, layers, dtype=torch.float64)
        return total if self.cross_task == "chain" else {name: d / len(cross.past) for name, d in total.items()}


METHODS: dict[str, Method] = {}  # each with its default cross-task rule; ``type(m)(rule)`` for another


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls()
    return cls


def sum_terms(replies: list[dict[str, Tensor]], layout: Mapping[str, Term]) -> dict[str, Tensor]:
    """The terms reduced over clients in reply order: summed, or concatenated where ``stack`` says so."""
    if not replies:
        raise MergeError("nothing to reduce: no client")
    out = {}
    for key, term in layout.items():
        parts = [r[key] for r in replies]
        if term.stack is not None:
            out[key] = torch.cat(parts, dim=term.stack)
        else:
            total = parts[0]
            for p in parts[1:]:
                total = total + p
            out[key] = total
    return out
