"""A Flower Grid that hands each message straight to a ClientApp in this process, one Context per node.

Enough of a SuperLink for protocol tests: messages and replies are deep copies (as if serialised), a node keeps
its Context between messages (as a SuperNode does; SecAgg+ keeps its keys there), and an exception in the app
becomes an error reply, as Flower turns a crashed ClientApp into one. No Ray, no processes, no sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from copy import deepcopy
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 7


@contextmanager
def server_identity():
    """Flower stamps new messages with the running ServerApp's identity; tests have to provide one."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SUPERLINK_NODE_ID, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class DirectGrid(Grid):
    def __init__(
        self, app: Callable[[Message, Context], Message], run_config: dict, num_nodes: int,
        fail: Callable[[int, Message], bool] | None = None,
    ) -> None:
        self.app, self.fail, self.sent = app, fail, 0
        self.replies: dict[str, Message] = {}
        self.contexts = {
            100 + i: Context(
                RUN_ID, 100 + i, {"partition-id": i, "num-partitions": num_nodes, "cache-dir": ""}, RecordDict(),
                dict(run_config),
            )
            for i in range(num_nodes)
        }

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Each message is answered at once; its reply waits to be pulled, as on a SuperLink."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            node = msg.metadata.dst_node_id
            incoming = deepcopy(msg)
            self.sent += 1
            try:
                if self.fail and self.fail(node - 100, incoming):
                    raise RuntimeError(f"node {node} failed on purpose")
                reply = self.app(incoming, self.contexts[node])
            except Exception as err:  # what Flower reports for a ClientApp that raised
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=incoming)
            self.replies[msg.metadata.message_id] = deepcopy(reply)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # What a real Grid also offers; the code under test never calls these.
    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError
