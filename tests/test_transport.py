"""How the server's transport reports nodes: one envelope per node asked, attributed by message id (the SuperLink
answers for a dead node under its own id), waiting for nodes logged, and round-timeout named when it is the cause
(in a round and at the start-up check); replies pulled every reply-poll seconds until all are in or round-timeout
has passed."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from common.config import RunConfig
from common.identity import PartitionBook
from common.protocol import RoundOrder
from deploy.inprocess import schedule_for
from server.aggregation import PlainAggregation
from server import transport
from server.startup import NodeCheckFailed, check_nodes
from server.transport import FlowerTransport, RoundFailed, wait_for_nodes
from tests.direct_grid import server_identity


class ScriptedGrid:
    """Nodes that answer (``ok``), die (the SuperLink answers "Node Unavailable" for them) or stay silent.

    ``arrives``: node -> the pull (0 = the first) from which its reply is there; pulls and what each asked
    for are recorded. Like Flower's grids, a reply is handed out once."""

    def __init__(self, ok=(), dead=(), silent=(), arrives=None):
        self.ok, self.dead, self.silent = set(ok), set(dead), set(silent)
        self.arrives = arrives or {}
        self.pending, self.pulls = {}, []

    def get_node_ids(self):
        return sorted(self.ok | self.dead | self.silent)

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.pending[f"m{i}"] = msg
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids):
        self.pulls.append(sorted(message_ids))
        replies = []
        for mid in sorted(message_ids):
            msg = self.pending[mid]
            node = msg.metadata.dst_node_id
            if self.arrives.get(node, 0) >= len(self.pulls):
                continue
            if node in self.ok:
                content = RecordDict({"arrays": ArrayRecord(torch_state_dict={"x": torch.ones(2)}),
                                      "config": ConfigRecord({"manifest": b""})})
                replies.append(Message(content, reply_to=msg))
            elif node in self.dead:
                replies.append(create_message_error_unavailable_res_message(msg.metadata, "node_unavail"))
            else:
                continue
            del self.pending[mid]
        return replies


class Clock:
    """server.transport's clock, advanced only by its sleeps: the poll loop's timing without waiting."""

    def __init__(self):
        self.now, self.sleeps = 1000.0, []

    def time(self):
        return self.now

    monotonic = time

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(transport, "time", fake)
    return fake


def test_a_dead_node_is_one_drop_under_its_own_id_not_the_superlinks(clock):
    grid = ScriptedGrid(ok=[11], dead=[12], silent=[13])
    with server_identity():
        envelopes = FlowerTransport(grid, 1, 5.0, 0.2).exchange("train", {"a": torch.zeros(1)}, {}, 1 << 20)
    assert [node for node, _ in envelopes] == [11, 12, 13]  # nobody is "node 1", nobody twice
    reasons = dict(envelopes)
    assert not isinstance(reasons[11], str)
    assert reasons[12].startswith("SuperLink error: Error: Node Unavailable")
    assert reasons[13] == "no reply within round-timeout 5 s (node gone or too slow)"


def test_when_every_node_times_out_the_error_names_round_timeout(clock):
    grid = ScriptedGrid(silent=[11, 12])
    with server_identity():
        envelopes = FlowerTransport(grid, 1, 0.01, 0.2).exchange("train", {"a": torch.zeros(1)}, {}, 1 << 20)
    order = RoundOrder(task=0, round=0, factor="B", block=(0, 5), A={}, B={})
    with pytest.raises(RoundFailed, match=r"task 0 round 0: 0 valid replies, min-clients is 1; node 11 \(partition unknown\): no "
                       r"reply within round-timeout 0.01 s"):
        PlainAggregation(None, 1, PartitionBook(None, 0.5, 0)).select(envelopes, order, None)


def test_when_every_node_times_out_at_the_start_up_check_the_error_names_round_timeout(clock, tmp_path):
    run = RunConfig(backbone="vit_tiny_test", img_size=32, classes_per_task=5, num_tasks=2, rounds_per_task=1,
                    local_epochs=1, max_train_per_class=4, max_test_per_class=2, rank=2, min_clients=2,
                    round_timeout=0.01)
    grid = ScriptedGrid(silent=[11, 12])
    with server_identity(), pytest.raises(NodeCheckFailed) as err:
        check_nodes(FlowerTransport(grid, 2, run.round_timeout, 0.2), schedule_for(run, tmp_path))
    assert str(err.value) == (
        "start-up check: 0 SuperNodes passed, min-clients is 2"
        "; node 11 (partition unknown): no reply within round-timeout 0.01 s (node gone or too slow)"
        "; node 12 (partition unknown): no reply within round-timeout 0.01 s (node gone or too slow)"
        "; round-timeout is 0.01 s: a first check that decodes a large data partition may need a longer one"
    )


def test_waiting_for_too_few_nodes_is_logged_at_once_and_the_error_names_both_settings(caplog):
    with pytest.raises(RoundFailed, match=r"only 1 SuperNodes connected after round-timeout 0.2 s, min-clients is 3"):
        wait_for_nodes(ScriptedGrid(ok=[11]), 3, 0.2)
    assert "waiting for SuperNodes: 1 connected [11], min-clients is 3" in caplog.text


def _exchange(grid, timeout=5.0, poll=0.2):
    with server_identity():
        return FlowerTransport(grid, 1, timeout, poll).exchange("train", {"a": torch.zeros(1)}, {}, 1 << 20)


def test_replies_arriving_over_several_polls_are_all_collected_asking_only_for_the_missing(clock):
    grid = ScriptedGrid(ok=[11, 12, 13], arrives={11: 0, 12: 2, 13: 3})
    envelopes = _exchange(grid)
    assert all(not isinstance(content, str) for _, content in envelopes)
    assert grid.pulls == [["m0", "m1", "m2"], ["m1", "m2"], ["m1", "m2"], ["m2"]]
    assert clock.sleeps == [0.2, 0.2, 0.2]  # reply-poll between pulls, none after the last reply


def test_the_wait_ends_as_soon_as_every_node_replied(clock):
    grid = ScriptedGrid(ok=[11], dead=[12])
    _exchange(grid, timeout=900.0)
    assert len(grid.pulls) == 1 and clock.sleeps == []


def test_a_node_silent_until_round_timeout_is_left_out_and_named(clock):
    grid = ScriptedGrid(ok=[11, 12], silent=[13], arrives={12: 1})
    envelopes = dict(_exchange(grid, timeout=1.0, poll=0.3))
    assert not isinstance(envelopes[11], str) and not isinstance(envelopes[12], str)
    assert envelopes[13] == "no reply within round-timeout 1 s (node gone or too slow)"
    assert clock.sleeps == [0.3] * 4 and len(grid.pulls) == 4  # pulls at 0, 0.3, 0.6, 0.9 s; 1.2 s is past it
    assert grid.pulls[-1] == ["m2"]
