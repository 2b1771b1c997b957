"""The warm ClientApp executor (cli/warm_exec.py) and the quick-polling SuperNode (cli/supernode.py): which tasks
the executor keeps in process, that a failing ClientApp becomes an error reply and the executor goes on, and the
flwr 1.42 names both are pinned to. The deployment tests (deploy/local.py starts every SuperNode with both) run
them for real."""

import inspect
import threading
from dataclasses import fields
from importlib.metadata import version
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SubStatus
from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.superexec import run_superexec as superexec_module
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult
from flwr.supernode.runtime import run_clientapp

import cli.warm_exec as warm


def spec(task_id: int, fab: str | None = "fab-a", kind: TaskType = TaskType.CLIENT_APP, deps: bool = False):
    return ExecutionSpec(task_type=kind, runtime_api_address="127.0.0.1:1", token="t", insecure=True,
                         root_certificates_path=None, runtime_dependency_install=deps, parent_pid=None,
                         suppress_output=True, task_id=task_id, fab_hash=fab)


def test_pinned_to_flwr_1_42s_runtime_api():
    """If this fails, Flower changed what the warm executor copies from run_clientapp and run_superexec: read
    flwr/supernode/runtime/run_clientapp.py:run_clientapp again and follow it."""
    assert version("flwr").startswith("1.42."), version("flwr")
    params = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
    assert params(run_clientapp.pull_task_input) == ["client"]
    assert params(run_clientapp.push_message) == ["client", "message", "context"]
    assert params(run_clientapp.push_task_output) == ["client", "context", "sub_status", "details"]
    names = {f.name for f in fields(ExecutionSpec)}
    assert {"task_type", "runtime_api_address", "token", "insecure", "root_certificates_path",
            "runtime_dependency_install", "fab_hash", "task_id"} <= names
    # run_superexec builds its executor through this module-level name, which main() replaces
    assert "get_executor(" in inspect.getsource(superexec_module.run_superexec)
    assert params(superexec_module.get_executor)[0] == "executor_type"
    # the steps run_task repeats, in run_clientapp's order (push_task_output sits in its exit handler)
    source = inspect.getsource(run_clientapp.run_clientapp)
    steps = ["HeartbeatSender(", "pull_task_input(", "install_from_fab(", "get_load_client_app_fn(",
             "client_app(message=message, context=context)", "push_message("]
    positions = [source.find(s) for s in steps]
    assert -1 not in positions and positions == sorted(positions), dict(zip(steps, positions))
    assert "push_task_output(" in source


def test_one_fab_runs_warm_and_every_other_task_the_stock_way(monkeypatch):
    started, ran = [], []
    monkeypatch.setattr(SubprocessExecutor, "launch", lambda self, s: started.append(s.task_id) or LaunchResult.accepted())
    done = threading.Event()

    def fake_run(s):
        ran.append(s.task_id)
        if len(ran) == 2:
            done.set()

    monkeypatch.setattr(warm, "run_task", fake_run)
    ex = warm.WarmExecutor()
    try:
        for s in [spec(1), spec(2, fab="fab-b"), spec(3, kind=TaskType.SERVER_APP), spec(4, deps=True),
                  spec(5, fab=None), spec(6)]:
            assert ex.launch(s).status == "accepted"
        assert done.wait(10)
    finally:
        ex.close()
    assert sorted(ran) == [1, 6] and ex.fab_hash == "fab-a"
    assert started == [2, 3, 4, 5]


def test_a_task_that_fails_or_hangs_outside_the_clientapp_holds_up_no_other(monkeypatch):
    """As on a SuperLink that died mid-transfer: one task's pull never returns, another's raises."""
    ran, done, release = [], threading.Event(), threading.Event()

    def flaky(s):
        ran.append(s.task_id)
        if s.task_id == 1:
            release.wait(10)
        elif s.task_id == 2:
            raise ConnectionError("Runtime API gone")
        else:
            done.set()

    monkeypatch.setattr(warm, "run_task", flaky)
    ex = warm.WarmExecutor()
    try:
        for task in (1, 2, 3):
            ex.launch(spec(task))
        assert done.wait(10)  # task 3 ran while task 1 still hung
    finally:
        release.set()
        ex.close()
    assert sorted(ran) == [1, 2, 3]


@pytest.mark.parametrize("fails", [False, True])
def test_run_task_replies_and_a_raising_clientapp_becomes_an_error_reply(monkeypatch, fails):
    pushed, outputs, closed = [], [], []
    for key in ("_run_id", "_node_id", "_task_id"):  # what pull_task_input sets in a real task
        monkeypatch.setattr(TaskIdentity, key, 1 if key != "_node_id" else 5)
    message = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=5, message_type="train")
    message.metadata.__dict__["_message_id"] = "m" * 64
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})

    class FakeClient:
        def close(self):
            closed.append(True)

    class FakeHeartbeat:
        is_running = False

        def __init__(self, fn):
            pass

        def start(self):
            self.is_running = True

        def stop(self):
            self.is_running = False

    def app(message, context):
        if fails:
            raise RuntimeError("CUDA out of memory")
        return Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=message)

    monkeypatch.setattr(warm.RuntimeHttpClient, "from_server_address", lambda **kw: FakeClient())
    monkeypatch.setattr(warm, "HeartbeatSender", FakeHeartbeat)
    monkeypatch.setattr(warm, "make_task_heartbeat_fn_http", lambda client: None)
    fab = SimpleNamespace(hash_str="h" * 64, content=b"")
    run = SimpleNamespace(fab_id="lorm-flower/lorm-flower", fab_version="0.1.0")
    monkeypatch.setattr(warm, "pull_task_input", lambda client: (message, context, run, fab))
    monkeypatch.setattr(warm, "_install", lambda h, c: None)
    monkeypatch.setattr(warm, "get_load_client_app_fn", lambda **kw: lambda *a: app)
    monkeypatch.setattr(warm, "push_message", lambda client, reply, ctx: pushed.append(reply))
    monkeypatch.setattr(warm, "push_task_output", lambda **kw: outputs.append(kw))

    warm.run_task(spec(1))

    assert len(pushed) == 1 and closed == [True]
    if fails:
        assert pushed[0].has_error() and "CUDA out of memory" in pushed[0].error.reason
        assert outputs[0]["sub_status"] == SubStatus.FAILED and "CUDA out of memory" in outputs[0]["details"]
    else:
        assert not pushed[0].has_error() and pushed[0].content["config"]["ok"] == 1
        assert outputs[0]["sub_status"] == SubStatus.COMPLETED


def test_only_the_subprocess_executor_is_replaced():
    assert isinstance(warm._executor(ExecutorType.SUBPROCESS), warm.WarmExecutor)
    with pytest.raises(ValueError, match="replaces the subprocess executor"):
        warm._executor(ExecutorType.KUBERNETES)


def test_the_supernode_wrapper_shortens_only_flowers_idle_wait(monkeypatch):
    """cli/supernode.py replaces the one fixed 3 s wait of flwr 1.42's SuperNode loop; if Flower changes that
    loop, read flwr/supernode/start_client_internal.py again."""
    import time

    import cli.supernode as node
    from flwr.supernode import start_client_internal

    source = inspect.getsource(start_client_internal)
    assert "\nimport time\n" in source and source.count(f"time.sleep({node.FLOWER_IDLE_S})") == 1
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = node._IdleClock(0.2)
    clock.sleep(3)
    clock.sleep(0.5)
    assert slept == [0.2, 0.5] and clock.monotonic is time.monotonic


@pytest.mark.parametrize("value", ["0", "4", "-1"])
def test_the_supernode_wrapper_refuses_an_idle_poll_out_of_range(monkeypatch, value):
    import cli.supernode as node

    monkeypatch.setattr("sys.argv", ["cli.supernode", "--idle-poll", value, "--insecure"])
    with pytest.raises(SystemExit):
        node.main()
