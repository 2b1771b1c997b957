"""How one order's replies become the terms a merge reads: one interface, a plain and a secure implementation.

``Aggregation.exchange(order, spec, method)`` sends the order to every client and returns an ``Aggregate``: the
method's terms reduced over the clients that counted (see common/methods/base.py), and what the round record
needs. The schedule calls it and never asks which implementation it has.

- ``PlainAggregation`` (privacy "plain"): every reply is validated against the spec and its partition against
  the server's book (common/identity.py), and dropped with a log line naming the node, its partition and the
  reason when it fails; the method's terms of the valid ones are reduced here.
- ``SecureAggregation`` (server/secagg.py, privacy "secagg"): clients send their terms through SecAgg+ and the
  server sees only their sum.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from logging import WARNING
from typing import Protocol

from flwr.common.logger import log
from torch import Tensor

from common.identity import IdentityError, PartitionBook
from common.layout import CLASS_SUMS, ReplySpec
from common.lorm_manifest_pb2 import GRAMS_REPLY, ROUND_REPLY
from common.methods import Method
from common.methods.base import COUNT_N, COUNT_NLOSS, sum_terms
from common.protocol import ClientReply, ProtocolError, RoundOrder
from common.validation import InvalidUpdate, validate_update
from common.wire import nbytes
from server.transport import Envelope, RoundFailed, Transport, too_large


@dataclass
class Aggregate:
    terms: dict[str, Tensor]  # the method's terms, reduced over the clients that counted
    clients: int
    dropped: int
    uplink_bytes_per_client: float
    downlink_bytes_per_client: float
    partitions: tuple[int, ...] = ()  # the partition-ids that counted (none known under secure aggregation)

    @property
    def train_loss(self) -> float:
        n = float(self.terms[COUNT_N].item())
        return float(self.terms[COUNT_NLOSS].item()) / n if COUNT_NLOSS in self.terms and n > 0 else float("nan")

    @property
    def record(self) -> dict:
        """The fields of a round's line in rounds.csv."""
        return {
            "clients": self.clients, "dropped": self.dropped, "partitions": " ".join(map(str, self.partitions)),
            "train_loss": self.train_loss,
            "uplink_bytes_per_client": self.uplink_bytes_per_client,
            "downlink_bytes_per_client": self.downlink_bytes_per_client,
        }


class Aggregation(Protocol):
    def exchange(self, order: RoundOrder, spec: ReplySpec, method: Method) -> Aggregate:
        """Send ``order`` to every client; the reduced terms of the replies that count (RoundFailed if too few)."""
        ...


class PlainAggregation:
    def __init__(self, transport: Transport, min_clients: int, partitions: PartitionBook) -> None:
        self.transport, self.min_clients, self.partitions = transport, min_clients, partitions

    def exchange(self, order: RoundOrder, spec: ReplySpec, method: Method) -> Aggregate:
        arrays, config = order.to_wire()
        envelopes = self.transport.exchange(spec.kind, arrays, config, spec.max_bytes)
        sizes = [nbytes(content[0]) for _, content in envelopes if not isinstance(content, str)]
        valid, dropped = self.select(envelopes, order, spec)
        terms = sum_terms([method.terms(order, reply) for reply in valid], spec.terms)
        partitions = tuple(sorted(reply.partition.partition_id for reply in valid))
        return Aggregate(terms, len(valid), dropped, sum(sizes) / max(len(sizes), 1), nbytes(arrays), partitions)

    def select(self, envelopes: Iterable[Envelope], order: RoundOrder, spec: ReplySpec) -> tuple[list[ClientReply], int]:
        """The replies fit to merge, and how many were dropped (each with a log line naming node, partition and
        reason).

        envelopes: (node id, (arrays, config)) as the client sent them, or (node id, reason) when unusable.
        """
        parsed, dropped = [], []
        for node, content in envelopes:
            if isinstance(content, str):
                dropped.append((node, content))
                continue
            try:
                parsed.append((node, _accept(node, *content, order, spec)))
            except (InvalidUpdate, ProtocolError, KeyError, ValueError, TypeError, RuntimeError) as err:
                dropped.append((node, f"{type(err).__name__}: {err}"))
        try:  # one reply per partition, each holding what its partition must
            counted, refused = self.partitions.settle(
                [(node, reply.partition, reply.num_examples) for node, reply in parsed], (order.task,)
            )
        except IdentityError as err:
            raise RoundFailed(f"{order.where}: {err}") from None
        dropped += refused
        valid = [reply for node, reply in parsed if node in counted]
        for node, reason in dropped:
            log(WARNING, "dropping %s from %s: %s", self.partitions.describe(node), order.where, reason)
        if len(valid) < self.min_clients:
            # e.g. a round-timeout too short names itself
            raise RoundFailed(
                f"{order.where}: {len(valid)} valid replies, min-clients is {self.min_clients}"
                f"{why_left_out(self.partitions, dropped)}"
            )
        return valid, len(dropped)


def why_left_out(book: PartitionBook, left_out: list[tuple[int, str]]) -> str:
    """'; node 7 (partition 2/3): reason' for each of the first few left-out nodes, to end an error that says too
    few nodes counted: the reasons (a round-timeout too short, a node gone) are what a user must act on."""
    return "".join(f"; {book.describe(node)}: {reason}" for node, reason in left_out[:5])


def _accept(node: int, arrays: dict, config: dict, order: RoundOrder, spec: ReplySpec) -> ClientReply:
    if (size := nbytes(arrays)) > spec.max_bytes:
        raise ProtocolError(too_large(size, spec.max_bytes))
    reply = ClientReply.from_wire(arrays, config, ROUND_REPLY if spec.factor else GRAMS_REPLY)
    if (reply.task, reply.round, reply.factor) != (order.task, order.round, spec.factor):
        raise ProtocolError(f"reply for task {reply.task} round {reply.round} factor {reply.factor!r} is stale")
    if reply.projected != spec.projected:
        raise ProtocolError(f"projected Grams (A G A^T) for {sorted(reply.projected)[:3]}, expected "
                            f"{sorted(spec.projected)[:3]}")
    tensors: dict[str, object] = {f"{f}:{name}": t for f, layers in reply.trained.items() for name, t in layers.items()}
    if spec.factor:
        tensors |= {"head.weight": reply.head_weight, "head.bias": reply.head_bias}
    if reply.class_sums is not None:  # one the spec does not state is refused as unexpected
        tensors[CLASS_SUMS] = reply.class_sums
    validate_update(
        str(node), tensors, reply.grams, reply.num_examples, spec.tensors, spec.gram_shapes, reply.gram_wire_dtype
    )
    return reply

