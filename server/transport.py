"""How the schedule reaches the clients: one order out to every node, whatever replies come back.

Plain aggregation (server/aggregation.py) speaks in plain tensors and configs; a ``Transport`` turns one order
into ``Envelope``s, one per node that answered (or failed). ``FlowerTransport`` is the real one, over a Flower
``Grid``; tests and the in-process comparison use deploy/inprocess.py's.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import Tensor

# A reply as the strategy sees it: (node id, (arrays, config)), or (node id, why it cannot be used).
Envelope = tuple[int, "tuple[dict[str, Tensor], dict] | str"]
CLIENT_ERROR = "client error"  # how the reason of a node whose ClientApp raised begins


class RoundFailed(RuntimeError):
    """Too few clients or valid replies for a merge: the run stops (its checkpoint allows a restart)."""


class Transport(Protocol):
    def exchange(self, kind: str, arrays: dict[str, Tensor], config: dict, max_reply_bytes: int) -> list[Envelope]:
        """Send the order to every client, return what each one replied (a reply over the limit is refused)."""
        ...


WAIT_LOG_EVERY = 30.0  # seconds between "still waiting" lines


def wait_for_nodes(grid: Grid, min_clients: int, timeout: float) -> list[int]:
    """The connected SuperNodes, once there are at least ``min_clients`` (RoundFailed after ``timeout`` s).

    Waiting is logged at once and every WAIT_LOG_EVERY s: a run that waits for nodes that never come would
    otherwise be silent for the whole round-timeout."""
    started = time.monotonic()
    logged = None
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_clients:
            if logged is not None:
                log(INFO, "%d SuperNodes connected after %.0f s", len(nodes), time.monotonic() - started)
            return nodes
        waited = time.monotonic() - started
        if waited > timeout:
            raise RoundFailed(
                f"only {len(nodes)} SuperNodes connected after round-timeout {timeout:g} s, min-clients is "
                f"{min_clients}: start more SuperNodes or lower min-clients"
            )
        if logged is None or waited - logged >= WAIT_LOG_EVERY:
            log(WARNING, "waiting for SuperNodes: %d connected %s, min-clients is %d (giving up after round-timeout "
                "%g s)", len(nodes), nodes, min_clients, timeout)
            logged = waited
        time.sleep(1.0)


class FlowerTransport:
    """Orders as Flower Messages to every connected SuperNode; replies that time out are simply absent.

    Replies are collected as Flower's ``Grid.send_and_receive`` does (push, then pull the ids not yet answered
    until none is left or the timeout passes), but pulled every ``poll`` seconds instead of its fixed 3 s: in a
    deployment that wait is most of a short round."""

    def __init__(self, grid: Grid, min_clients: int, timeout: float, poll: float) -> None:
        self.grid, self.min_clients, self.timeout, self.poll = grid, min_clients, timeout, poll

    def exchange(self, kind: str, arrays: dict[str, Tensor], config: dict, max_reply_bytes: int) -> list[Envelope]:
        record, conf = ArrayRecord(torch_state_dict=arrays), ConfigRecord(config)
        messages = [
            Message(RecordDict({"arrays": record, "config": conf}), dst_node_id=node, message_type=kind)
            for node in wait_for_nodes(self.grid, self.min_clients, self.timeout)
        ]
        replies = self._send_and_receive(messages)
        # Replies are matched to orders by message id, not by their source: the error reply the SuperLink writes
        # for a node that stopped sending heartbeats comes from the SuperLink's own node id.
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        answered = {asked[r.metadata.reply_to_message_id]: r for r in replies
                    if r.metadata.reply_to_message_id in asked}
        return [
            (node, _unwrap(answered[node], max_reply_bytes) if node in answered
             else f"no reply within round-timeout {self.timeout:g} s (node gone or too slow)")
            for node in (m.metadata.dst_node_id for m in messages)
        ]

    def _send_and_receive(self, messages: list[Message]) -> list[Message]:
        # A message the SuperLink refused has the id None (Grid.push_messages logs it): it will have no reply.
        waiting = {i for i in self.grid.push_messages(messages) if i is not None}
        end = time.time() + self.timeout
        replies: list[Message] = []
        while waiting and time.time() < end:
            pulled = list(self.grid.pull_messages(waiting))
            replies += pulled
            waiting -= {r.metadata.reply_to_message_id for r in pulled}
            if waiting:
                time.sleep(self.poll)
        return replies


def too_large(size: int, limit: int) -> str:
    return f"payload of {size} bytes exceeds the {limit} a valid reply can have"


def _unwrap(msg: Message, limit: int) -> "tuple[dict[str, Tensor], dict] | str":
    if msg.has_error():
        source = "SuperLink error" if msg.metadata.src_node_id == SUPERLINK_NODE_ID else CLIENT_ERROR
        return f"{source}: {msg.error.reason}"
    if "arrays" not in msg.content or "config" not in msg.content:
        return f"reply lacks arrays or config: {sorted(msg.content.keys())}"
    if (size := msg.content["arrays"].count_bytes()) > limit:  # refused before it is decoded
        return too_large(size, limit)
    return msg.content["arrays"].to_torch_state_dict(), dict(msg.content["config"])
