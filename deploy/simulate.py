"""Run the app in Flower's simulation engine with a SuperLink of its own, and fail loudly when the run fails.

    python -m deploy.simulate [--supernodes 3] [--run-config "rank=8 beta=0.1"] [--keep-superlink]

`flwr run . --stream` alone starts a background SuperLink that outlives it and exits 0 even when the run
failed; this wrapper starts its own simulation SuperLink on a free port (FLWR_HOME under outputs/, never the
user's ~/.flwr), streams the logs, asks the SuperLink for the run's final status, stops what it started and
exits non-zero unless the run finished as completed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from deploy.processes import BIN, OFFLINE, ROOT, flwr_run, free_port, run_status, stop, wait_for_port


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
    env = os.environ | OFFLINE | {"FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
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
