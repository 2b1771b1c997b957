"""The same tiny job simulated and deployed on loopback, in one invocation: per-round times and their ratio.

    python -m bench.deploy_vs_sim [--supernodes 3] [--run-config "rank=8"] [--workdir outputs/.bench13]

Simulated: Flower's simulation engine with a SuperLink of its own (deploy/simulate.py). Deployed: a SuperLink
and K SuperNodes as separate processes on loopback (deploy/local.py), one torch thread per node as
`python -m deploy.local` gives them on this machine. Both runs read the same run config; each writes its
rounds.csv, whose wall_s (the server's time from sending a round's order to its merge) is what is compared, so
start-up (Ray, processes, the first torch import) is left out of both. The job: EfficientNet-Lite0 at 32 px,
2 tasks x 2 rounds, every SuperNode in every round (min-clients = K).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

from deploy.local import local_deployment
from deploy.processes import ROOT, flwr_run, run_status
from deploy.simulate import simulation_superlink

JOB = (
    "backbone='efficientnet_lite0' img-size=32 classes-per-task=5 num-tasks=2 rounds-per-task=2 local-epochs=1 "
    "max-train-per-class=20 max-test-per-class=10 rank=4 round-timeout=300"
)


def merged(*configs: str) -> str:
    """Run-config strings joined, a later key replacing an earlier one (`flwr run` refuses a repeated key)."""
    pairs = {}
    for text in configs:
        pairs |= dict(re.findall(r"([\w-]+)=('[^']*'|\"[^\"]*\"|\S+)", text))
    return " ".join(f"{k}={v}" for k, v in pairs.items())


def round_times(folder: Path) -> list[tuple[str, float]]:
    """(task.round[+factor], wall seconds) of every line of a run's rounds.csv."""
    with open(folder / "rounds.csv") as f:
        return [(f"{r['task']}.{r['round']} {r['factor']}", float(r["wall_s"])) for r in csv.DictReader(f)]


def simulated(workdir: Path, k: int, run_config: str) -> tuple[str, float]:
    started = time.perf_counter()
    with simulation_superlink(workdir / "sim") as env:
        run_id = flwr_run(env, "sim", ROOT, run_config, ["--federation-config", f"num-supernodes={k}"])
        status = run_status(env, "sim", run_id)
    return status, time.perf_counter() - started


def deployed(workdir: Path, k: int, run_config: str) -> tuple[str, float]:
    started = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // k)  # as deploy/local.py: K nodes share the cores
    with local_deployment(workdir / "dep", k, node_config=f"num-threads={threads}") as dep:
        run_id = flwr_run(dep.env, dep.connection, ROOT, run_config, [])
        status = run_status(dep.env, dep.connection, run_id)
    return status, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--run-config", default="", help="overrides added to the tiny job's")
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / ".bench-deploy-vs-sim")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so local_deployment stops what it started
    workdir = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    out = workdir / "runs"
    job = merged(f"{JOB} min-clients={args.supernodes} output-dir='{out}'", args.run_config)
    results = {}
    for mode, runner in (("simulated", simulated), ("deployed", deployed)):
        status, total = runner(workdir, args.supernodes, f"{job} run-name='{mode}'")
        if not status.startswith("finished:completed"):
            print(f"[bench] {mode} run ended {status}: see {workdir}", file=sys.stderr)
            return 1
        results[mode] = round_times(out / mode)
        print(f"[bench] {mode}: {status} in {total:.0f} s", flush=True)
    sim, dep = results["simulated"], results["deployed"]
    print(f"\n{'round':<10}{'simulated s':>13}{'deployed s':>12}{'ratio':>8}")
    for (name, s), (_, d) in zip(sim, dep, strict=True):
        print(f"{name:<10}{s:>13.1f}{d:>12.1f}{d / s:>8.2f}")
    total_sim, total_dep = sum(s for _, s in sim), sum(d for _, d in dep)
    print(f"{'mean':<10}{total_sim / len(sim):>13.1f}{total_dep / len(dep):>12.1f}{total_dep / total_sim:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
