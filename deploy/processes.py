"""Process plumbing shared by the simulation and deployment runners: ports, spawning, stopping, `flwr` calls.

Every process is started in a session of its own with its logs in a file, and stopped by PID. Flower's
SuperLink and SuperNode start their SuperExec in yet another session (it only follows its parent's death
through a polling monitor), so stopping a process group is not enough: `Processes.stop_all` also ends every
descendant it saw and, last, every process whose FLWR_HOME lies under the workdir.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Flower's processes phone home by default (telemetry events, a PyPI update check in a background thread):
# everything started here talks only to the machines of the federation.
OFFLINE = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _end(procs: list[psutil.Process], timeout: float) -> None:
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def stop(*procs: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM each process group at once, then their detached descendants; SIGKILL whatever lingers."""
    children = [c for p in procs for c in _descendants(p.pid)]  # before they are re-parented out of reach
    live = [p for p in procs if p.poll() is None]
    for p in live:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for p in live:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    _end([c for c in children if c.is_running()], timeout=5)


def processes_under(home: Path) -> list[psutil.Process]:
    """Live processes whose FLWR_HOME is `home` or below it: everything a deployment started, however detached."""
    home = str(home.resolve())
    found = []
    for p in psutil.process_iter():
        try:
            flwr_home = p.environ().get("FLWR_HOME", "")
            if (flwr_home == home or flwr_home.startswith(home + os.sep)) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_under(home: Path, timeout: float = 20.0) -> None:
    """End every process whose FLWR_HOME is `home` or below, e.g. the local SuperLink `flwr run .` left behind."""
    _end(processes_under(home), timeout=timeout)


class Processes:
    """The processes one runner started, each logging to a file, stopped together."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], env: dict, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        with open(self.workdir / f"{name}.log", "a") as log:  # a restarted process adds to its log
            proc = subprocess.Popen(
                [*prefix, *cmd], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        stop(*self.procs)
        stop_under(self.workdir, timeout=5)


def flwr_run(env: dict, connection: str, app: Path, run_config: str, extra: list[str], stream_to=None) -> str:
    """`flwr run` with logs streamed; returns the run id (raises when the run never started)."""
    cmd = [str(BIN / "flwr"), "run", str(app), connection, "--stream", *extra]
    if run_config:
        cmd += ["--run-config", run_config]
    run_id = None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            (stream_to or sys.stdout).write(line)
            if "Successfully started run" in line:
                run_id = line.split()[-1]
        proc.wait()
    finally:
        # Interrupted (Ctrl-C, SIGTERM): `flwr run --stream` would otherwise keep streaming until the run ends.
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
    if run_id is None:
        raise RuntimeError(f"`flwr run` did not start a run (exit code {proc.returncode})")
    return run_id


def run_status(env: dict, connection: str, run_id: str) -> str:
    """The SuperLink's final word on a run, e.g. 'finished:completed' or 'finished:failed' (RuntimeError when
    the SuperLink cannot be asked, e.g. because it died with the run)."""
    out = subprocess.run(
        [str(BIN / "flwr"), "ls", connection, "--run-id", run_id, "--format", "json"],
        env=env, capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"the SuperLink could not tell the status of run {run_id} (is it down?); `flwr ls` said: "
            f"{(out.stdout + out.stderr).strip()[-500:]}"
        )
    run = json.loads(out.stdout)["runs"][0]
    return f"{run['status']}" + (f" ({run['status-details']})" if run.get("status-details", "N/A") != "N/A" else "")


def nodes_online(env: dict, connection: str) -> int:
    """How many SuperNodes the SuperLink counts online; 0 while it cannot be asked (`flwr` then exits 0 too, with
    `"success": false`)."""
    out = subprocess.run([str(BIN / "flwr"), "supernode", "ls", connection, "--format", "json"],
                         env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        return 0
    return sum(n["status"] == "online" for n in json.loads(out.stdout).get("nodes", []))
