"""Nodes prove which partition they hold: the server's book (common/identity.py) and the start-up check
(server/startup.py) refuse a node with another num-partitions, a partition another node holds, or samples that
are not its partition's; log lines name the node id and the partition it proved."""

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from client.local import LocalWork
from common.config import ConfigError, NodeConfig, RunConfig
from common.experiment import build_experiment
from common.identity import WITHHELD, IdentityError, Partition, PartitionBook, partition_samples
from common.layout import CHECK
from common.protocol import NodeCheck, check_order
from deploy.inprocess import InProcessTransport, run_in_process, schedule_for
from server.startup import NodeCheckFailed, check_nodes
from server.state import CheckpointError
from tests.direct_grid import DirectGrid, server_identity

RUN = RunConfig(
    backbone="vit_tiny_test", img_size=32, classes_per_task=5, num_tasks=2, rounds_per_task=1, local_epochs=1,
    max_train_per_class=6, max_test_per_class=2, rank=2, min_clients=2, seed=4,
)
K = 3


@pytest.fixture(scope="module")
def stream():
    return build_experiment(RUN, "", "cpu", "").stream


def proof(stream, pid, k=K, tasks=(0,)):
    fingerprint, count = partition_samples(stream, tasks, pid, k, RUN.beta, RUN.seed)
    return Partition(pid, k, fingerprint), count


def test_the_book_learns_num_partitions_from_the_majority_and_refuses_the_rest(stream):
    book = PartitionBook(stream, RUN.beta, RUN.seed)
    claims = [(10, *proof(stream, 0)), (11, *proof(stream, 1)), (12, *proof(stream, 0, k=4))]
    counted, refused = book.settle(claims, (0,))
    assert (book.num_partitions, counted) == (3, [10, 11])
    assert refused == [(12, "claims partition 0/4: the run has num-partitions 3 (is this SuperNode's node config "
                             "up to date?)")]
    assert book.describe(11) == "node 11 (partition 1/3)" and book.describe(12) == "node 12 (partition unknown)"


def test_a_tie_on_num_partitions_names_every_node(stream):
    with pytest.raises(IdentityError, match=r"\(node 10: 3, node 11: 4\) with no majority; set num-partitions"):
        PartitionBook(stream, RUN.beta, RUN.seed).settle([(10, *proof(stream, 0)), (11, *proof(stream, 0, k=4))], (0,))


def test_a_duplicate_partition_goes_to_its_previous_holder_else_the_lowest_node_id(stream):
    book = PartitionBook(stream, RUN.beta, RUN.seed, K)
    assert book.settle([(20, *proof(stream, 2)), (9, *proof(stream, 2))], (0,)) == (
        [9], [(20, "claims partition 2/3: partition 2 is already held by node 9")]
    )
    # node 9 holds partition 2 now: a newcomer with a lower id does not take it over
    counted, refused = book.settle([(5, *proof(stream, 2)), (9, *proof(stream, 2))], (0,))
    assert counted == [9] and refused[0][0] == 5
    # a restarted SuperNode (a new node id) takes its partition back once the old id is gone
    assert book.settle([(30, *proof(stream, 2))], (0,)) == ([30], [])


def test_samples_that_are_not_the_partitions_are_refused(stream):
    book = PartitionBook(stream, RUN.beta, RUN.seed, K)
    right, count = proof(stream, 1)
    other_task, _ = proof(stream, 1, tasks=(1,))
    assert book.settle([(1, other_task, count)], (0,))[1][0][1].startswith("claims partition 1/3: its samples")
    assert book.settle([(1, right, count + 1)], (0,))[1][0][1] == f"claims partition 1/3: it counts {count + 1} " \
        f"samples, the partition has {count}"
    assert book.settle([(1, Partition(1, K, bytes(16)), count)], (0,))[1][0][1].endswith(
        "its samples are not the partition's (does the node's data or data setting differ from the run's?)"
    )
    assert book.settle([(1, right, count)], (0,)) == ([1], [])


def test_a_withheld_partition_is_checked_for_num_partitions_only(stream):
    book = PartitionBook(stream, RUN.beta, RUN.seed, K)
    assert book.settle([(1, Partition(WITHHELD, K), 0), (2, Partition(WITHHELD, K), 0)], range(2)) == ([1, 2], [])
    assert book.settle([(3, Partition(WITHHELD, 4), 0)], range(2))[1][0][0] == 3


def _federation(nodes):
    """An in-process federation whose clients have the given (partition-id, num-partitions)."""
    transport = InProcessTransport(RUN, K)
    transport.works = [LocalWork.create(RUN, NodeConfig(partition_id=p, num_partitions=k, cache_dir=""))
                       for p, k in nodes]
    return transport


def test_the_start_up_check_stops_the_run_naming_each_misconfigured_node(tmp_path, caplog):
    # the hostile user's case: a fourth SuperNode started with num-partitions 4 (its samples overlap the others')
    with pytest.raises(NodeCheckFailed, match=r"no round has run: node 3 \(partition unknown\): claims partition 0/4: "
                       r"the run has num-partitions 3"):
        run_in_process(schedule_for(RUN, tmp_path / "a"), _federation([(0, 3), (1, 3), (2, 3), (0, 4)]))
    with pytest.raises(NodeCheckFailed, match=r"node 2 \(partition unknown\): claims partition 0/3: partition 0 is "
                       r"already held by node 0"):
        run_in_process(schedule_for(RUN, tmp_path / "b"), _federation([(0, 3), (1, 3), (0, 3)]))
    assert not (tmp_path / "a" / "config.json").exists() and not (tmp_path / "b" / "state.pt").exists()

    caplog.clear()
    run_in_process(schedule_for(RUN, tmp_path / "c"), _federation([(0, 3), (1, 3), (2, 3)]))
    assert "start-up check passed (num-partitions 3): node 0 (partition 0/3), node 1 (partition 1/3), node 2 " \
           "(partition 2/3)" in caplog.text


def test_a_node_config_that_contradicts_the_runs_num_partitions_fails_on_the_node():
    with pytest.raises(ConfigError, match="node config num-partitions 4 differs from the run's num-partitions 3"):
        LocalWork.create(RUN.model_copy(update={"num_partitions": 3}), NodeConfig(partition_id=0, num_partitions=4))


def test_resuming_with_another_num_partitions_than_the_checkpoints_run_is_refused(tmp_path):
    run_in_process(schedule_for(RUN, tmp_path / "r"), _federation([(0, 3), (1, 3), (2, 3)]))  # learns 3
    with pytest.raises(CheckpointError, match="belongs to a run over 3 partitions, this run sets num-partitions 4"):
        schedule_for(RUN.model_copy(update={"num_partitions": 4}), tmp_path / "r")
    assert schedule_for(RUN.model_copy(update={"num_partitions": 3}), tmp_path / "r").partitions.num_partitions == 3


def test_under_secagg_a_node_answers_the_check_and_withholds_its_partition():
    from client.client_app import app

    run = RUN.model_copy(update={"privacy": "secagg"})
    grid = DirectGrid(app, run.model_dump(by_alias=True), 1)
    arrays, config = check_order()
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=arrays), "config": ConfigRecord(config)})
    with server_identity():
        reply = grid.send_and_receive([Message(content, dst_node_id=100, message_type=CHECK)])[0]
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    check = NodeCheck.from_wire(reply.content["arrays"].to_torch_state_dict(), dict(reply.content["config"]))
    assert check == NodeCheck(Partition(WITHHELD, 1), 0)
