"""head = "analytic" on the real schedule with in-process clients: the federated ridge head against an independent
reference, the model evaluated and exported, a restart, and malformed head-sums replies.

The reference never touches the client code: the pre-trained network built afresh (no LoRA, no peft), the
features of every client's task data stacked, and numpy's lstsq on the augmented system [X; sqrt(lam) I] W =
[Y; 0] (as tests/test_analytic.py), lam = head-ridge * mean(diag(X^T X)).
"""

import csv

import numpy as np
import pytest
import torch

from common.analytic import head_rows
from common.backbones import backbone_spec
from common.config import RunConfig
from common.data import client_task_indices
from common.export import MODEL_DIR, load_network
from common.layout import CHECK, HEAD_SUMS
from common.metrics import accuracy_per_task
from common.model import HEAD
from deploy.inprocess import InProcessTransport, run_in_process, schedule_for

RUN = RunConfig(
    backbone="vit_tiny_test", img_size=32, classes_per_task=5, num_tasks=2, rounds_per_task=1, local_epochs=1,
    max_train_per_class=8, max_test_per_class=4, rank=2, min_clients=2, seed=3, beta=0.3, head="analytic",
)
K = 4


@torch.no_grad()
def _w0_features(run: RunConfig, dataset, indices) -> np.ndarray:
    """(n, d) float64: ``dataset[indices]`` through a freshly built pre-trained network (no adapter slots)."""
    net = backbone_spec(run.backbone).build(run.weights or None).eval()
    x = torch.stack([dataset[int(i)][0] for i in indices])
    return net(x).double().numpy()


def _reference(run: RunConfig, exp, clients: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W (seen, d), the stacked features, their labels) over every client's data of every task."""
    parts = [client_task_indices(exp.stream, t, pid, clients, run.beta, run.seed)
             for t in range(len(exp.tasks)) for pid in range(clients)]
    indices = np.concatenate(parts)
    X = _w0_features(run, exp.stream.train, indices)
    labels = np.asarray(exp.stream.train_labels)[indices]
    seen = exp.block(len(exp.tasks) - 1)[1]
    Y = np.eye(seen)[labels]
    lam = run.head_ridge * (X**2).sum(0).mean()
    A = np.vstack([X, np.sqrt(lam) * np.eye(X.shape[1])])
    W = np.linalg.lstsq(A, np.vstack([Y, np.zeros((X.shape[1], seen))]), rcond=None)[0].T
    return W, X, labels


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_the_federated_head_is_the_ridge_solve_on_the_stacked_w0_features_and_is_what_is_evaluated_and_exported(
    tmp_path,
):
    schedule = schedule_for(RUN, tmp_path / "run")
    exp = schedule.exp
    sizes = [[len(client_task_indices(exp.stream, t, pid, K, RUN.beta, RUN.seed)) for pid in range(K)]
             for t in range(2)]
    assert all(len(set(s)) > 1 for s in sizes), sizes  # clients of unequal size in both tasks
    state = run_in_process(schedule, InProcessTransport(RUN, K))

    W_ref, X, labels = _reference(RUN, exp, K)
    assert state.head_sums.n == len(labels) == sum(map(sum, sizes))
    seen = exp.block(1)[1]
    weight, bias = head_rows(state.head_sums, RUN.head_ridge, seen)
    # the sums travel as float32 (gram-dtype, class sums): ~6e-8 relative, times the ridge system's conditioning
    # (measured 1.6e-6; 1.3e-6 with gram-dtype float64, the class sums' float32 then dominating)
    assert _rel(weight[:seen], W_ref) < 1e-5
    assert torch.equal(bias, torch.zeros_like(bias))

    # evaluated: W0 (no delta, though the rounds trained adapters) with that head
    test_idx = np.flatnonzero(np.asarray(exp.stream.test_labels) < seen)
    Xt = _w0_features(RUN, exp.stream.test, test_idx)
    predicted = (Xt @ W_ref.T).argmax(1)
    assert state.acc[-1] == accuracy_per_task(predicted, np.asarray(exp.stream.test_labels)[test_idx], exp.tasks)

    # exported: the same network and head, so `lorm-flower predict` gives the evaluated predictions
    net, _, classes = load_network(tmp_path / "run" / MODEL_DIR)
    assert len(classes) == seen
    x = torch.stack([exp.stream.test[int(i)][0] for i in test_idx])
    with torch.no_grad():
        logits = net(x).double().numpy()
    assert _rel(logits, Xt @ W_ref.T) < 1e-4
    assert (logits.argmax(1) == predicted).all()


def test_the_client_app_answers_the_head_sums_query_as_the_in_process_clients_do(tmp_path):
    """The same run over Flower messages (``query.head`` to the ClientApp, tests/direct_grid.py) and in process."""
    from client.client_app import app
    from server.aggregation import PlainAggregation
    from server.startup import check_nodes
    from server.transport import FlowerTransport
    from tests.direct_grid import DirectGrid, server_identity

    run = RUN.model_copy(update={"num_tasks": 1})
    direct = run_in_process(schedule_for(run, tmp_path / "in-process"), InProcessTransport(run, K))
    with server_identity():
        schedule = schedule_for(run, tmp_path / "flower")
        transport = FlowerTransport(DirectGrid(app, run.model_dump(by_alias=True), K), 1, 60.0, 0.2)
        check_nodes(transport, schedule)
        state = schedule.run(PlainAggregation(transport, run.min_clients, schedule.partitions))
    assert torch.equal(state.head_sums.G, direct.head_sums.G) and torch.equal(state.head_sums.C, direct.head_sums.C)
    assert state.acc == direct.acc


def test_a_restarted_server_ends_with_the_same_analytic_head(tmp_path):
    whole = run_in_process(schedule_for(RUN, tmp_path / "whole"), InProcessTransport(RUN, K))

    class Crash(Exception):
        pass

    class CrashingTransport(InProcessTransport):
        def exchange(self, kind, *args):
            # calls: 0 start-up check, 1 task 0's head sums, 2 task 1's (no adapter rounds, no Grams)
            if self.calls == 2:
                raise Crash()
            return super().exchange(kind, *args)

    with pytest.raises(Crash):
        run_in_process(schedule_for(RUN, tmp_path / "cut"), CrashingTransport(RUN, K))
    resumed = schedule_for(RUN, tmp_path / "cut")
    # the checkpoint holds task 0's sums; task 1's end is done again from its start
    assert (resumed.state.task, resumed.state.round, len(resumed.state.acc)) == (1, 0, 1)
    assert 0 < resumed.state.head_sums.n < whole.head_sums.n
    final = run_in_process(resumed, InProcessTransport(RUN, K))

    assert final.acc == whole.acc
    assert torch.equal(final.head_sums.G, whole.head_sums.G) and torch.equal(final.head_sums.C, whole.head_sums.C)
    assert final.head_sums.n == whole.head_sums.n


def test_an_analytic_run_trains_no_adapter_and_logs_each_head_sums_exchange_in_rounds_csv(tmp_path):
    transport = InProcessTransport(RUN, K)
    kinds = []
    exchange = transport.exchange
    transport.exchange = lambda kind, *args: kinds.append(kind) or exchange(kind, *args)
    run_in_process(schedule_for(RUN, tmp_path / "r"), transport)
    assert kinds == [CHECK] + [HEAD_SUMS] * RUN.num_tasks
    with open(tmp_path / "r" / "rounds.csv") as f:
        lines = list(csv.DictReader(f))
    assert [(line["task"], line["factor"]) for line in lines] == [(str(t), "head-sums") for t in range(RUN.num_tasks)]
    assert all(int(line["clients"]) == K and float(line["uplink_bytes_per_client"]) > 0 for line in lines)


def test_trained_head_runs_keep_no_head_sums_and_ask_for_none(tmp_path):
    run = RUN.model_copy(update={"head": "trained", "num_tasks": 1})
    transport = InProcessTransport(run, K)
    kinds = []
    exchange = transport.exchange
    transport.exchange = lambda kind, *args: kinds.append(kind) or exchange(kind, *args)
    state = run_in_process(schedule_for(run, tmp_path / "r"), transport)
    assert state.head_sums is None and "query.head" not in kinds


def test_malformed_head_sums_are_dropped_with_a_log_line_and_the_rest_still_count(tmp_path, monkeypatch, caplog):
    from client.local import LocalWork

    honest = LocalWork.head_sums
    corrupt = {
        1: lambda r: setattr(r, "grams", {HEAD: r.grams[HEAD] - torch.eye(len(r.grams[HEAD])) * 1e3}),  # not PSD
        2: lambda r: setattr(r, "class_sums", torch.full_like(r.class_sums, float("nan"))),
        3: lambda r: setattr(r, "class_sums", r.class_sums[:-1]),  # a class short
    }

    def head_sums(self, order):
        reply = honest(self, order)
        corrupt.get(self.node.partition_id, lambda r: None)(reply)
        return reply

    monkeypatch.setattr(LocalWork, "head_sums", head_sums)
    run = RUN.model_copy(update={"num_tasks": 1, "min_clients": 1})
    schedule = schedule_for(run, tmp_path / "r")
    state = run_in_process(schedule, InProcessTransport(run, K))
    dropped = [m for m in caplog.messages if m.startswith("dropping") and "task 0 end" in m]
    assert len(dropped) == 3, dropped
    assert any("negative diagonal" in m for m in dropped) and any("NaN" in m for m in dropped)
    assert any("class_sums: tensor shape (4, 64)" in m for m in dropped)
    assert state.head_sums.n == len(client_task_indices(schedule.exp.stream, 0, 0, K, run.beta, run.seed))
