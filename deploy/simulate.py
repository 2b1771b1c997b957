"""Run the app in Flower's simulation engine with a SuperLink of its own, and fail loudly when the run fails.

    python -m deploy.simulate [--supernodes 3] [--run-config "rank=8 beta=0.1"] [--keep-superlink]

`flwr run . --stream` alone starts a background SuperLink that outlives it and exits 0 even when the run
failed; this wrapper starts its own simulation SuperLink on a free port (FLWR_HOME under outputs/, never the
user's ~/.flwr), streams the logs, asks the SuperLink for the run's final status, stops what it started and
exits non-zero unless the run finished as completed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group (a SuperLink has children: ServerApp, Ray), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def simulation_superlink(workdir: Path):
    """A simulation SuperLink on a free loopback port; yields the environment that points `flwr` at it."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    home = workdir / "flwr-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = os.environ | {"FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(workdir / "superlink.log", "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--port", str(port),
             "--database", str(workdir / "superlink.db"), "--disable-runtime-dependency-installation"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            wait_for_port("127.0.0.1", port, proc)
            yield env
        finally:
            stop(proc)


def flwr_run(env: dict, connection: str, app: Path, run_config: str, extra: list[str], stream_to=None) -> str:
    """`flwr run` with logs streamed; returns the run id (raises when the run never started)."""
    cmd = [str(BIN / "flwr"), "run", str(app), connection, "--stream", *extra]
    if run_config:
        cmd += ["--run-config", run_config]
    run_id = None
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            (stream_to or sys.stdout).write(line)
            if "Successfully started run" in line:
                run_id = line.split()[-1]
    if run_id is None:
        raise RuntimeError(f"`flwr run` did not start a run (exit code {proc.returncode})")
    return run_id


def run_status(env: dict, connection: str, run_id: str) -> str:
    """The SuperLink's final word on a run, e.g. 'finished:completed' or 'finished:failed'."""
    out = subprocess.run(
        [str(BIN / "flwr"), "ls", connection, "--run-id", run_id, "--format", "json"],
        env=env, capture_output=True, text=True, check=True,
    )
    run = json.loads(out.stdout)["runs"][0]
    return f"{run['status']}" + (f" ({run['status-details']})" if run.get("status-details", "N/A") != "N/A" else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernodes", type=int, default=3, help="simulated SuperNodes (clients)")
    parser.add_argument("--run-config", default="", help='overrides, e.g. "rank=8 beta=0.1"')
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / ".simulation")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with simulation_superlink(args.workdir) as env:
        run_id = flwr_run(env, "sim", ROOT, args.run_config, ["--federation-config", f"num-supernodes={args.supernodes}"])
        status = run_status(env, "sim", run_id)
    print(f"run {run_id}: {status} in {time.perf_counter() - started:.0f} s")
    return 0 if status.startswith("finished:completed") else 1


if __name__ == "__main__":
    sys.exit(main())
