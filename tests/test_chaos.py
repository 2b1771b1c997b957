"""Chaos in a real deployment (a loopback SuperLink and 3 SuperNodes, each its own processes): during one run a
SuperNode is killed (SIGKILL to all its processes) and started again, then the SuperLink process is killed
(SIGKILL; the ServerApp it started lives on, retrying) and started again on its state database, and the run is
submitted again while the old ServerApp may still hold the run folder.

What must hold:
- the run finishes (`finished:completed`) by resuming from its checkpoint;
- rounds.csv records exactly the drops that happened: one, the killed node in the round it died in, under its
  own node id and partition (the SuperLink's own id is never reported as a node);
- the accuracy matrix equals that of the same run replayed without Flower (deploy/inprocess.py) with the same
  participation: each round and task end merges the partitions the deployed run merged (rounds.csv and the task
  end's log line name them). A round that merged two partitions cannot equal one that merged three, so this is
  the undisturbed run with the disturbance's only effect on the mathematics put back in. The comparison allows
  one test image per task (2 points) for float rounding: the deployed server merges and evaluates with a
  different torch thread count than the replay, which may move a logit by ~1e-7.
"""

import csv
import io
import json
import re
import signal
import threading
import time

import psutil
import pytest
import torch

from common.config import RunConfig
from deploy.hosts import Host
from deploy.inprocess import InProcessTransport, run_in_process, schedule_for
from deploy.local import local_deployment
from deploy.processes import ROOT, flwr_run, processes_under, run_status

pytestmark = pytest.mark.deployment

SETTINGS = dict(
    backbone="efficientnet_lite0", img_size=32, classes_per_task=5, num_tasks=2, rounds_per_task=3, local_epochs=1,
    max_train_per_class=20, max_test_per_class=10, rank=4, min_clients=2, num_partitions=3, round_timeout=300.0,
    seed=0,
)
K = 3
TEST_PER_TASK = 5 * 10  # classes per task x test images per class


def _overrides(out) -> str:
    """Every setting, defaults included, so that both submissions are the same run even if a default changes."""
    values = RunConfig(**SETTINGS, output_dir=str(out), run_name="chaos").model_dump(by_alias=True)
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in values.items())


def _rounds(folder) -> list[dict]:
    try:
        with open(folder / "rounds.csv") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def _wait_rounds(folder, n: int, log: io.StringIO, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while len(_rounds(folder)) < n:
        assert time.monotonic() < deadline, f"{n} rounds not done after {timeout:.0f} s:\n{log.getvalue()[-4000:]}"
        time.sleep(0.5)


def _kill(processes: list[psutil.Process]) -> None:
    assert processes, "nothing to kill"
    for p in processes:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)


def _replay(rounds: list[dict], task_ends: list[set[int]], folder) -> list[list[float]]:
    """The same run in process, each round and task end merging the partitions the deployed run merged."""
    run = RunConfig(**SETTINGS)
    per_call = [set(range(K))]  # call 0: the start-up check
    for task in range(run.num_tasks):
        per_call += [set(map(int, r["partitions"].split())) for r in rounds if int(r["task"]) == task]
        per_call.append(task_ends[task])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the SuperNodes (num-threads=1)
    try:
        transport = InProcessTransport(
            run, K, fault=lambda call, node, kind: None if node in per_call[call] else "absent"
        )
        return run_in_process(schedule_for(run, folder), transport).acc
    finally:
        torch.set_num_threads(threads)


def test_killed_supernode_and_superlink_the_run_resumes_and_ends_as_replayed(tmp_path):
    started = time.monotonic()
    out = tmp_path / "out"
    folder = out / "chaos"
    first_log, second_log = io.StringIO(), io.StringIO()
    with local_deployment(tmp_path / "dep", K, node_config="num-threads=1") as dep:
        first = {}
        runner = threading.Thread(target=lambda: first.update(
            run_id=flwr_run(dep.env, dep.connection, ROOT, _overrides(out), [], stream_to=first_log)
        ))
        runner.start()

        # 1. SuperNode 2 dies during task 0's round 1 and comes back.
        _wait_rounds(folder, 1, first_log)
        killed_node = _node_id(first_log)
        _kill(processes_under(dep.workdir / "supernode-2"))
        dep.start_supernode("supernode-2", Host(), f"partition-id=2 num-partitions={K} num-threads=1")

        # 2. The SuperLink process dies during task 1 and restarts on its database; Flower fails the run there, and
        # its streaming `flwr run` is stopped like a user's Ctrl-C.
        _wait_rounds(folder, 4, first_log)
        _kill([psutil.Process(p.pid) for p in dep.procs.procs if "flower-superlink" in p.args[0] and p.poll() is None])
        done_before = len(_rounds(folder))
        dep.start_superlink()
        runner.join(timeout=60)
        for p in processes_under(dep.workdir / "cli"):
            p.terminate()
        runner.join(timeout=60)
        assert not runner.is_alive()

        # 3. Submitted again, the run resumes from its checkpoint and finishes.
        dep.wait_for_nodes(K, [], timeout=300)
        run_id = flwr_run(dep.env, dep.connection, ROOT, _overrides(out), [], stream_to=second_log)
        status = run_status(dep.env, dep.connection, run_id)
        deployed_s = time.monotonic() - started

    text = first_log.getvalue() + second_log.getvalue()
    (tmp_path / "first.log").write_text(first_log.getvalue())  # kept with the deployment's logs, for a post-mortem
    (tmp_path / "second.log").write_text(second_log.getvalue())
    assert status.startswith("finished:completed"), second_log.getvalue()[-6000:]
    assert re.search(rf"resuming from .*state.pt at task 1 round {done_before - 3}", second_log.getvalue()), text[-4000:]

    rounds = _rounds(folder)
    assert [(int(r["task"]), int(r["round"])) for r in rounds] == [(t, r) for t in range(2) for r in range(3)]
    drops = [(int(r["task"]), int(r["round"]), int(r["dropped"])) for r in rounds if int(r["dropped"])]
    assert drops == [(0, 1, 1)], rounds
    assert rounds[1]["partitions"] == "0 1"
    assert re.search(rf"dropping node {killed_node} \(partition 2/3\) from task 0 round 1: SuperLink error: .*Node "
                     "Unavailable", text), text[-6000:]
    assert "dropping node 1 " not in text  # the SuperLink's own id is never reported as a node

    task_ends = [set(map(int, m.split())) for m in re.findall(r"\[task \d/2 end\] Grams of \d clients \(partitions "
                                                              r"([\d ]+)\)", text)]
    assert len(task_ends) == 2, text[-6000:]
    replayed = _replay(rounds, task_ends, tmp_path / "replay")
    deployed = json.loads((folder / "metrics.json").read_text())["acc_matrix"]
    print(f"deployed (with both kills) in {deployed_s:.0f} s; matrix {deployed}, replay {replayed}")
    assert len(deployed) == len(replayed) == 2
    for got, want in zip(deployed, replayed):
        assert max(abs(a - b) for a, b in zip(got, want)) <= 100 / TEST_PER_TASK + 1e-6, (deployed, replayed)


def _node_id(log: io.StringIO) -> int:
    """SuperNode 2's Flower node id, from the start-up check's log line."""
    match = re.search(r"node (\d+) \(partition 2/3\)", log.getvalue())
    assert match, log.getvalue()[-4000:]
    return int(match.group(1))
