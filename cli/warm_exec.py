"""A warm SuperExec for a SuperNode started with ``--isolation process``: the ClientApp runs inside this process.

    python -m cli.warm_exec --insecure --runtime-api-address 127.0.0.1:9094 [--parent-pid PID]

It takes every flag of ``flower-superexec`` (it is ``flower-superexec`` with another executor) and runs as that
node's only SuperExec. The stock one starts a fresh ``flwr-clientapp`` process for every message, which imports
torch, timm and peft and rebuilds the experiment each time: 20-60 s per message on a small machine against a few
seconds of work. Here the tasks of one app bundle (FAB) run in this process through the same steps as
``flwr-clientapp`` (flwr/supernode/runtime/run_clientapp.py), so imports and the app's in-process caches
(common/experiment.py:build_experiment) live across messages, as they do in simulation.

- Each task runs on a thread of its own; their ClientApp calls take turns (a lock), their transfers do not, so
  a task stuck on a dead connection holds up no other.
- One FAB hash is served in process: the first ClientApp task's. A task of any other FAB (another app, or a new
  version of this one, whose modules would clash with the loaded ones) and a task that asks for runtime dependency
  installation start a ``flwr-clientapp`` process, the stock way.
- A ClientApp that raises sends an error reply to the server (as ``flwr-clientapp`` does); the process goes on.
- Heartbeats, the task token, the Runtime API's TLS and ``--superexec-auth-secret-file`` are Flower's own code
  paths (the AcquireTask loop is ``flower-superexec``'s).

It lives in ``cli``, not ``client``: a package this process imported would shadow the FAB's own copy of it when
the ClientApp is loaded from the FAB's folder. Pinned to flwr 1.42's Runtime API (tests/test_warm_exec.py fails
if a name it uses changes).
"""

from __future__ import annotations

import os
import threading
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore import log
from flwr.supercore.cli.flower_superexec import flower_superexec
from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
from flwr.supercore.superexec import run_superexec as superexec_module
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # read by flower-superexec's task loop


def run_task(spec: ExecutionSpec) -> None:
    """One ClientApp task in this process: ``run_clientapp`` without its process exit, signal handlers, parent
    monitor and dependency installation."""
    certificates = None if spec.insecure or not spec.root_certificates_path else Path(
        spec.root_certificates_path).read_bytes()
    client = RuntimeHttpClient.from_server_address(
        server_address=spec.runtime_api_address,
        insecure=spec.insecure,
        root_certificates=certificates,
        interceptors=[RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(spec.token)],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = reply = context = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        _install(fab.hash_str, fab.content)
        app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
            run.fab_id, run.fab_version, fab.hash_str
        )
        with _APP_LOCK:  # one ClientApp at a time: they share the process's model and data
            reply = app(message=message, context=context)
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # the same error reply flwr-clientapp sends; this process goes on
        code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"
        if isinstance(ex, LoadClientAppError):
            code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "An exception was raised when attempting to load `ClientApp`"
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        details = reason
        if message is not None:
            reply = Message(Error(code=code, reason=reason), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as ex:
            log(ERROR, "Failed to push reply message", exc_info=ex)
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()


_INSTALLED: set[str] = set()
_APP_LOCK = threading.Lock()


def _install(fab_hash: str, content: bytes) -> None:
    """Unpack the FAB where Flower loads apps from, once per process (rewriting the files of loaded modules is
    pointless, and a FAB's hash fixes its content)."""
    with _APP_LOCK:  # two first tasks in flight must not unpack into the same folder at once
        if fab_hash not in _INSTALLED:
            install_from_fab(content, skip_prompt=True)
            _INSTALLED.add(fab_hash)


class WarmExecutor(SubprocessExecutor):
    """ClientApp tasks of one FAB in this process, each on a thread of its own (a task whose transfer hangs, e.g.
    on a SuperLink that died mid-message, must not hold up the next; the ClientApp calls themselves take turns);
    the rest as subprocesses."""

    def __init__(self) -> None:
        self.fab_hash: str | None = None

    def warm(self, spec: ExecutionSpec) -> bool:
        """Whether ``spec`` runs in this process (and, for the first ClientApp task, fixes the FAB served)."""
        if spec.task_type != TaskType.CLIENT_APP or spec.runtime_dependency_install or not spec.fab_hash:
            return False
        if self.fab_hash is None:
            self.fab_hash = spec.fab_hash
            log(INFO, "warm ClientApp executor: FAB %s runs in this process", spec.fab_hash[:12])
        return spec.fab_hash == self.fab_hash

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if not self.warm(spec):
            return super().launch(spec)
        threading.Thread(target=_run_logged, args=(spec,), name=f"clientapp-{spec.task_id}", daemon=True).start()
        return LaunchResult.accepted()


def _run_logged(spec: ExecutionSpec) -> None:
    try:
        run_task(spec)
    except Exception as ex:  # e.g. the Runtime API went away; other tasks are not affected
        log(ERROR, "warm ClientApp task %d failed outside the ClientApp", spec.task_id, exc_info=ex)


def _executor(executor_type: ExecutorType, **_: object) -> WarmExecutor:
    if executor_type != ExecutorType.SUBPROCESS:  # flower-superexec turns the ValueError into a clear exit
        raise ValueError(f"the warm executor replaces the subprocess executor, not {executor_type!r}")
    return WarmExecutor()


def main() -> None:
    """``flower-superexec``, every flag as is, with WarmExecutor in place of its subprocess executor."""
    # Each message waits up to this long for the executor to ask for it (Flower's default: 1 s).
    os.environ.setdefault(POLL_ENV, "0.1")
    superexec_module.get_executor = _executor
    flower_superexec()


if __name__ == "__main__":
    main()
