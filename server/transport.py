"""How the schedule reaches the clients: one order out to every node, whatever replies come back.

Plain aggregation (server/aggregation.py) speaks in plain tensors and configs; a ``Transport`` turns one order
into ``Envelope``s, one per node that answered (or failed). ``FlowerTransport`` is the real one, over a Flower
``Grid``; tests and the in-process comparison use deploy/inprocess.py's.
"""

from __future__ import annotations

import time
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

# A reply as the strategy sees it: (node id, (arrays, config)), or (node id, why it cannot be used).
Envelope = tuple[int, "tuple[dict[str, Tensor], dict] | str"]


class RoundFailed(RuntimeError):
    """Too few clients or valid replies for a merge: the run stops (its checkpoint allows a restart)."""


class Transport(Protocol):
    def exchange(self, kind: str, arrays: dict[str, Tensor], config: dict, max_reply_bytes: int) -> list[Envelope]:
        """Send the order to every client, return what each one replied (a reply over the limit is refused)."""
        ...


def wait_for_nodes(grid: Grid, min_clients: int, timeout: float) -> list[int]:
    """The connected SuperNodes, once there are at least ``min_clients`` (RoundFailed after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_clients:
            return nodes
        if time.monotonic() > deadline:
            raise RoundFailed(f"only {len(nodes)} SuperNodes connected, min-clients is {min_clients}")
        time.sleep(1.0)


class FlowerTransport:
    """Orders as Flower Messages to every connected SuperNode; replies that time out are simply absent."""

    def __init__(self, grid: Grid, min_clients: int, timeout: float) -> None:
        self.grid, self.min_clients, self.timeout = grid, min_clients, timeout

    def exchange(self, kind: str, arrays: dict[str, Tensor], config: dict, max_reply_bytes: int) -> list[Envelope]:
        record, conf = ArrayRecord(torch_state_dict=arrays), ConfigRecord(config)
        messages = [
            Message(RecordDict({"arrays": record, "config": conf}), dst_node_id=node, message_type=kind)
            for node in wait_for_nodes(self.grid, self.min_clients, self.timeout)
        ]
        replies = [_unwrap(msg, max_reply_bytes) for msg in self.grid.send_and_receive(messages, timeout=self.timeout)]
        answered = {node for node, _ in replies}
        # A node that died or hung gives no reply at all; say so, so the round's log names it.
        silent = [(m.metadata.dst_node_id, f"no reply within {self.timeout:.0f} s (node gone or too slow)")
                  for m in messages if m.metadata.dst_node_id not in answered]
        return replies + silent


def too_large(size: int, limit: int) -> str:
    return f"payload of {size} bytes exceeds the {limit} a valid reply can have"


def _unwrap(msg: Message, limit: int) -> Envelope:
    node = msg.metadata.src_node_id
    if msg.has_error():
        return node, f"client error: {msg.error.reason}"
    if "arrays" not in msg.content or "config" not in msg.content:
        return node, f"reply lacks arrays or config: {sorted(msg.content.keys())}"
    if (size := msg.content["arrays"].count_bytes()) > limit:  # refused before it is decoded
        return node, too_large(size, limit)
    return node, (msg.content["arrays"].to_torch_state_dict(), dict(msg.content["config"]))
