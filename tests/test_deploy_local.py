"""End to end in deployment: a real SuperLink and real SuperNode processes (no simulation engine).

1. loopback, K = 3, insecure; 2. the same run with every process in a network namespace of its own (root
only); 3. TLS + SuperNode authentication, where an unregistered SuperNode is refused. Each checks the results
and that every process it started is gone afterwards.
"""

import csv
import io
import json
import os
import socket
import ssl
import subprocess

import psutil
import pytest

from deploy.hosts import Host
from deploy.local import local_deployment
from deploy.netns import NetnsUnavailable, namespaces
from deploy.processes import ROOT, flwr_run, processes_under, run_status

pytestmark = pytest.mark.deployment

K = 3
# One torch thread per ClientApp: K of them train at once on this machine.
NODE_CONFIG = "num-threads=1"


def _overrides(out_dir, k, tasks=2, rounds=2):
    return (
        f"backbone='efficientnet_lite0' img-size=32 classes-per-task=5 num-tasks={tasks} rounds-per-task={rounds} "
        f"local-epochs=2 max-train-per-class=30 max-test-per-class=20 lr=0.003 rank=4 min-clients={k} "
        f"output-dir='{out_dir}' run-name='e2e'"
    )


def _run(dep, out_dir, k, **shape):
    log = io.StringIO()
    run_id = flwr_run(dep.env, dep.connection, ROOT, _overrides(out_dir, k, **shape), [], stream_to=log)
    status = run_status(dep.env, dep.connection, run_id)
    assert status.startswith("finished:completed"), log.getvalue()[-4000:]
    return out_dir / "e2e"


def _check_two_task_results(folder, k):
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [len(row) for row in metrics["acc_matrix"]] == [1, 2]
    assert metrics["faa"] > 25.0, metrics  # 10 classes seen: chance is 10%
    with open(folder / "rounds.csv") as f:
        rounds = list(csv.DictReader(f))
    assert [(r["task"], r["round"], r["factor"]) for r in rounds] == [
        ("0", "0", "B"), ("0", "1", "A"), ("1", "0", "B"), ("1", "1", "A")
    ]
    assert {r["clients"] for r in rounds} == {str(k)}  # every round merged every SuperNode


def _tree(dep):
    """PIDs of every process the deployment started and of their descendants (SuperExecs) at this moment."""
    pids = set()
    for proc in dep.procs.procs:
        pids.add(proc.pid)
        if proc.poll() is None:
            pids.update(c.pid for c in psutil.Process(proc.pid).children(recursive=True))
    return pids


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _check_all_stopped(dep, seen):
    assert len(dep.procs.procs) >= 3 and len(seen) > len(dep.procs.procs)  # SuperLink, SuperNodes, SuperExecs
    assert [p.returncode is None for p in dep.procs.procs] == [False] * len(dep.procs.procs)
    assert [pid for pid in seen if _alive(pid)] == []
    # SuperExecs, ServerApp and ClientApp processes run in sessions of their own: look them up by FLWR_HOME too
    assert processes_under(dep.workdir) == []


def test_local_deployment_three_supernodes(tmp_path):
    with local_deployment(tmp_path / "deploy", K, node_config=NODE_CONFIG) as dep:
        folder = _run(dep, tmp_path / "outputs", K)
        seen = _tree(dep)
    _check_two_task_results(folder, K)
    _check_all_stopped(dep, seen)


def test_network_namespaces(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    try:
        with namespaces(K) as hosts, local_deployment(tmp_path / "deploy", K, hosts=hosts,
                                                      node_config=NODE_CONFIG) as dep:
            assert dep.address == f"{hosts.link.address}:8000"
            folder = _run(dep, tmp_path / "outputs", K)
            # bytes each SuperNode namespace sent into the bridge: its replies crossed it
            sent = [int(open(f"/sys/class/net/{h.iface}/statistics/rx_bytes").read()) for h in hosts.nodes]
            seen = _tree(dep)
    except NetnsUnavailable as err:
        pytest.skip(str(err))
    with open(folder / "rounds.csv") as f:
        replies = sum(float(r["uplink_bytes_per_client"]) for r in csv.DictReader(f))
    assert replies > 0 and min(sent) > 0.9 * replies, (sent, replies)  # 0.9: nodes' replies differ a little
    _check_two_task_results(folder, K)
    _check_all_stopped(dep, seen)
    tag = hosts.link.prefix[-1].split("-")[1]  # namespaces lorm-<tag>-*, interfaces lf*<tag>*
    assert f"lorm-{tag}" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def test_tls_and_supernode_auth(tmp_path):
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(ROOT / "deploy" / "certs.sh"), "-n", "3", str(certs)], check=True,
                   capture_output=True)
    k = 2  # keys 0 and 1 are registered, key 2 is not
    with local_deployment(tmp_path / "deploy", k, tls=certs, auth=True, node_config=NODE_CONFIG) as dep:
        host, port = dep.address.rsplit(":", 1)
        tls = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        with socket.create_connection((host, int(port)), timeout=5) as raw, tls.wrap_socket(raw, server_hostname=host):
            pass  # the SuperLink speaks TLS with the certificate our CA signed

        intruder = dep.start_supernode("intruder", Host(), f"partition-id=0 num-partitions={k}",
                                       key=certs / "supernode-2")
        assert intruder.wait(timeout=180) != 0  # refused: it exits instead of retrying
        assert "Failed to activate SuperNode" in (dep.workdir / "intruder.log").read_text()
        assert "No SuperNode found with the given public key" in (dep.workdir / "superlink.log").read_text()
        assert dep.nodes_online() == k

        folder = _run(dep, tmp_path / "outputs", k, tasks=1, rounds=1)
        seen = _tree(dep)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [len(row) for row in metrics["acc_matrix"]] == [1]
    assert metrics["faa"] > 40.0, metrics  # 5 classes: chance is 20%
    with open(folder / "rounds.csv") as f:
        assert [r["clients"] for r in csv.DictReader(f)] == [str(k)]
    _check_all_stopped(dep, seen)
