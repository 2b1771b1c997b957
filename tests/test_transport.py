"""How the server's transport reports nodes: one envelope per node asked, attributed by message id (the SuperLink
answers for a dead node under its own id), waiting for nodes logged, and round-timeout named when it is the cause."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from common.identity import PartitionBook
from server.aggregation import PlainAggregation
from server.transport import FlowerTransport, RoundFailed, wait_for_nodes
from tests.direct_grid import server_identity


class ScriptedGrid:
    """Nodes that answer (``ok``), die (the SuperLink answers "Node Unavailable" for them) or stay silent."""

    def __init__(self, ok=(), dead=(), silent=()):
        self.ok, self.dead, self.silent = set(ok), set(dead), set(silent)

    def get_node_ids(self):
        return sorted(self.ok | self.dead | self.silent)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            node = msg.metadata.dst_node_id
            if node in self.ok:
                content = RecordDict({"arrays": ArrayRecord(torch_state_dict={"x": torch.ones(2)}),
                                      "config": ConfigRecord({"manifest": b""})})
                replies.append(Message(content, reply_to=msg))
            elif node in self.dead:
                replies.append(create_message_error_unavailable_res_message(msg.metadata, "node_unavail"))
        return replies


def test_a_dead_node_is_one_drop_under_its_own_id_not_the_superlinks():
    grid = ScriptedGrid(ok=[11], dead=[12], silent=[13])
    with server_identity():
        envelopes = FlowerTransport(grid, 1, 5.0).exchange("train", {"a": torch.zeros(1)}, {}, 1 << 20)
    assert [node for node, _ in envelopes] == [11, 12, 13]  # nobody is "node 1", nobody twice
    reasons = dict(envelopes)
    assert not isinstance(reasons[11], str)
    assert reasons[12].startswith("SuperLink error: Error: Node Unavailable")
    assert reasons[13] == "no reply within round-timeout 5 s (node gone or too slow)"


def test_when_every_node_times_out_the_error_names_round_timeout():
    grid = ScriptedGrid(silent=[11, 12])
    with server_identity():
        envelopes = FlowerTransport(grid, 1, 0.01).exchange("train", {"a": torch.zeros(1)}, {}, 1 << 20)
    order = SimpleNamespace(task=0, round=0)
    with pytest.raises(RoundFailed, match=r"0 valid replies, min-clients is 1; node 11 \(partition unknown\): no "
                       r"reply within round-timeout 0.01 s"):
        PlainAggregation(None, 1, PartitionBook(None, 0.5, 0)).select(envelopes, order, None)


def test_waiting_for_too_few_nodes_is_logged_at_once_and_the_error_names_both_settings(caplog):
    with pytest.raises(RoundFailed, match=r"only 1 SuperNodes connected after round-timeout 0.2 s, min-clients is 3"):
        wait_for_nodes(ScriptedGrid(ok=[11]), 3, 0.2)
    assert "waiting for SuperNodes: 1 connected [11], min-clients is 3" in caplog.text
