"""Which share of the data a node holds, proven in every reply, and the server's book of who holds what.

Partitions are not negotiated: each SuperNode is started with ``partition-id`` and ``num-partitions`` and derives
its samples from the run's seed (common/data/partition.py). A node started with another num-partitions, or with
a partition-id another node already has, would train on samples other nodes also hold and be merged with full
weight. So every reply carries the node's ``Partition``: its partition-id, its num-partitions and a fingerprint of
the samples it trained on (their indices and labels). The server computes every partition's samples itself and
refuses a reply that disagrees (``PartitionBook.settle``).

The run's num-partitions is the ``num-partitions`` setting, or, when that is 0, the value most nodes report at
the start-up check (a tie is an error); from then on every reply must agree.

Under privacy "secagg" a node withholds its partition-id and fingerprint (the server would learn each node's
sample counts from them, which secure aggregation hides), so only num-partitions is checked.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.data import Stream, client_task_indices

WITHHELD = -1  # partition-id of a node that does not say which partition it holds (privacy "secagg")


class IdentityError(ValueError):
    """Nodes whose partitions cannot be reconciled (they disagree on num-partitions with no majority)."""


@dataclass(frozen=True)
class Partition:
    partition_id: int
    num_partitions: int
    fingerprint: bytes = b""

    @property
    def withheld(self) -> bool:
        return self.partition_id == WITHHELD

    def __str__(self) -> str:
        return f"partition ?/{self.num_partitions}" if self.withheld else \
            f"partition {self.partition_id}/{self.num_partitions}"


def partition_samples(
    stream: Stream, tasks: Sequence[int], partition_id: int, num_partitions: int, beta: float, seed: int
) -> tuple[bytes, int]:
    """(fingerprint, sample count) of the partition's training samples over ``tasks``.

    The fingerprint hashes each task's id, sample indices and labels, so two nodes agree only if they hold the same
    samples with the same labels. A data folder with another layout or other labels disagrees; one with the same
    layout and labels but other pixels does not (pixels are not hashed).
    """
    digest = hashlib.sha256()
    count = 0
    for task in tasks:
        indices = client_task_indices(stream, task, partition_id, num_partitions, beta, seed).astype("<i8")
        for part in (np.asarray([task], dtype="<i8"), indices, stream.train_labels[indices].astype("<i8")):
            digest.update(part.tobytes())
        count += len(indices)
    return digest.digest()[:16], count


class PartitionBook:
    """The server's view of the partitions: the run's num-partitions, what each partition must hold and which
    node last proved each one (for log lines and for settling two nodes that claim the same partition)."""

    def __init__(self, stream: Stream, beta: float, seed: int, num_partitions: int = 0) -> None:
        self.num_partitions = num_partitions  # 0 = not known yet: learnt at the first settle
        self.owner: dict[int, int] = {}  # partition-id -> node id
        self.held: dict[int, Partition] = {}  # node id -> the partition it last proved
        self._expected = functools.lru_cache(maxsize=None)(
            lambda tasks, pid, k: partition_samples(stream, tasks, pid, k, beta, seed)
        )

    def describe(self, node: int) -> str:
        """'node 7 (partition 2/3)': what the node proved, never a guess; 'partition unknown' before it has."""
        return f"node {node} ({self.held[node] if node in self.held else 'partition unknown'})"

    def settle(
        self, claims: Sequence[tuple[int, Partition, int]], tasks: Sequence[int]
    ) -> tuple[list[int], list[tuple[int, str]]]:
        """Which of the replies (node, the partition it claims, the samples it counted, over ``tasks``) count.

        Returns (nodes whose replies count, [(node, reason)] for the rest). A claim is refused when its
        num-partitions is not the run's, its fingerprint or sample count is not what that partition holds, or
        another node proved the same partition in this exchange: the partition's previous holder wins, else the
        lowest node id (Flower does not say which reply came first).
        """
        tasks = tuple(tasks)
        if not self.num_partitions and claims:
            self.num_partitions = _majority(claims)
        refused: list[tuple[int, str]] = []
        taken: dict[int, int] = {}
        for node, claim, count in sorted(claims, key=lambda c: (self.owner.get(c[1].partition_id) != c[0], c[0])):
            reason = self._wrong(claim, count, tasks)
            if reason is None and not claim.withheld and claim.partition_id in taken:
                reason = f"partition {claim.partition_id} is already held by node {taken[claim.partition_id]}"
            if reason:
                refused.append((node, f"claims {claim}: {reason}"))
                continue
            self.held[node] = claim
            if not claim.withheld:
                taken[claim.partition_id] = node
        self.owner |= taken
        refused_nodes = {node for node, _ in refused}
        return [node for node, _, _ in claims if node not in refused_nodes], refused

    def _wrong(self, claim: Partition, count: int, tasks: tuple[int, ...]) -> str | None:
        if claim.num_partitions != self.num_partitions:
            return f"the run has num-partitions {self.num_partitions} (is this SuperNode's node config up to date?)"
        if claim.withheld:
            return None
        if not 0 <= claim.partition_id < claim.num_partitions:
            return "partition-id out of range"
        fingerprint, expected = self._expected(tasks, claim.partition_id, claim.num_partitions)
        if count != expected:
            return f"it counts {count} samples, the partition has {expected}"
        if claim.fingerprint != fingerprint:
            return "its samples are not the partition's (does the node's data or data setting differ from the run's?)"
        return None


def _majority(claims: Sequence[tuple[int, Partition, int]]) -> int:
    """The num-partitions most claims report; IdentityError on a tie, which no rule could break fairly."""
    votes = Counter(claim.num_partitions for _, claim, _ in claims).most_common()
    if len(votes) > 1 and votes[0][1] == votes[1][1]:
        by_node = ", ".join(f"node {node}: {claim.num_partitions}" for node, claim, _ in claims)
        raise IdentityError(
            f"SuperNodes disagree on num-partitions ({by_node}) with no majority; set num-partitions in the run "
            "config or fix the SuperNodes' node config"
        )
    return votes[0][0]
