"""The start-up check, before any round of a (fresh or resumed) run: every connected SuperNode checks its settings
and its data and says which partition it holds (common/identity.py).

Whatever is wrong with a node that answers (a bad node config, an image file that does not decode, another
num-partitions, a partition another node holds, samples that are not its partition's) stops the run here, with
every such node named at once, before anything is trained or written. A node that does not answer (gone, or
slower than round-timeout) is left out with a log line: it may come back for the rounds. If too few nodes pass,
the error gives each left-out node's reason, and names round-timeout when nodes timed out.
"""

from __future__ import annotations

from logging import INFO, WARNING

from flwr.common.logger import log

from common.identity import IdentityError
from common.layout import CHECK
from common.protocol import CHECK_REPLY_BYTES, NodeCheck, ProtocolError, check_order
from server.aggregation import why_left_out
from server.schedule import Schedule
from server.transport import CLIENT_ERROR, Transport


class NodeCheckFailed(RuntimeError):
    """A SuperNode failed the start-up check, or too few passed it: the run stops before its first round."""


def check_nodes(transport: Transport, schedule: Schedule) -> list[int]:
    """Run the start-up check over ``transport``; the nodes that passed it (NodeCheckFailed otherwise)."""
    book, min_clients = schedule.partitions, schedule.config.min_clients
    problems, left_out, claims = [], [], []
    for node, content in transport.exchange(CHECK, *check_order(), CHECK_REPLY_BYTES):
        if isinstance(content, str):
            if content.startswith(CLIENT_ERROR):  # the node answered: its ClientApp refused to start
                problems.append((node, content))
            else:
                log(WARNING, "start-up check: node %d left out: %s", node, content)
                left_out.append((node, content))
            continue
        try:
            reply = NodeCheck.from_wire(*content)
        except ProtocolError as err:
            problems.append((node, f"ProtocolError: {err}"))
            continue
        claims.append((node, reply.partition, reply.num_examples))
    try:
        passed, refused = book.settle(claims, range(len(schedule.exp.tasks)))
    except IdentityError as err:
        raise NodeCheckFailed(f"start-up check: {err}") from None
    problems += refused
    if problems:
        raise NodeCheckFailed(
            "start-up check failed, no round has run: "
            + "; ".join(f"{book.describe(node)}: {reason}" for node, reason in problems)
        )
    if len(passed) < min_clients:
        # The first check decodes every image of a node's partition (common/data/check.py): with a large one it
        # can outlast a round-timeout that suits the rounds. The transport's reason for a silent node names it.
        slow = any("round-timeout" in reason for _, reason in left_out)
        raise NodeCheckFailed(
            f"start-up check: {len(passed)} SuperNodes passed, min-clients is {min_clients}"
            f"{why_left_out(book, left_out)}"
            + (f"; round-timeout is {schedule.config.round_timeout:g} s: a first check that decodes a large data "
               "partition may need a longer one" if slow else "")
        )
    log(INFO, "start-up check passed (num-partitions %d): %s", book.num_partitions,
        ", ".join(book.describe(node) for node in passed))
    return passed
