"""LoRM ServerApp: validates the run config, builds the evaluation model and runs the strategy's schedule."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.config import DEFAULT_CACHE_DIR, RunConfig, resolve_device
from common.data.check import check_images
from common.experiment import build_experiment
from server.report import RunReport
from server.schedule import Schedule
from server.state import ServerState, config_fingerprint
from server.strategy import FCILStrategy

app = ServerApp()


def execute(run: RunConfig, name: str, drive: Callable[[Schedule], ServerState]) -> dict[str, Any]:
    """The whole run (or the rest of it, from its checkpoint); returns metrics.json's content.

    ``drive`` runs the schedule: over Flower (``FCILStrategy(schedule).start(grid)``) or in process. The run
    folder is locked throughout (RunLocked when another process has it); nothing in it is written before the
    first checkpoint, so a run refused at start-up (bad checkpoint, bad node, bad data) leaves it as it was.
    """
    device = resolve_device(run.device)
    report = RunReport(Path(run.output_dir).expanduser().resolve() / name)
    with report.locked():
        return _execute(run, name, report, device, drive)


def _execute(
    run: RunConfig, name: str, report: RunReport, device: str, drive: Callable[[Schedule], ServerState]
) -> dict[str, Any]:
    settings = run.model_dump(by_alias=True)
    # A run stops for good when its SuperLink restarts (Flower marks it failed): say how to continue it.
    log(INFO, "%s run %s: results in %s (device %s); if the run stops, submitting it again with run-name=%r "
        "resumes it from its last checkpoint", run.strategy, name, report.folder, device, name)
    exp = build_experiment(run, run.data_dir, device)
    # The evaluation's image files, decoded now: a bad one would otherwise crash the first task end.
    test = np.flatnonzero(np.isin(exp.stream.test_labels, [c for task in exp.tasks for c in task]))
    check_images(exp.stream.test, test, what="the server's evaluation split", cache_dir=DEFAULT_CACHE_DIR)
    # Only settings that change results enter the fingerprint: a resumed run may get a new timeout or folder.
    # num-partitions is checked against the one the checkpoint's run had (0 there: learnt at start-up).
    fingerprint = config_fingerprint({
        k: v for k, v in settings.items()
        if k not in ("round-timeout", "output-dir", "run-name", "device", "num-partitions")
    })
    schedule = Schedule(exp, report, fingerprint, merge_device=device)
    if schedule.finished:
        log(INFO, "run %s finished earlier: nothing to do, %s left as it was", name, report.folder)
        return report.read_results()
    started = time.perf_counter() - schedule.state.wall_s  # a resumed run's wall time adds up its sessions
    state = drive(schedule)
    result = report.write_results(
        state.acc, exp.test_samples, {"tasks_done": len(state.acc), "wall_s": time.perf_counter() - started},
        state.task_aware,
    )
    log(INFO, "%s finished: FAA %.2f%%, average forgetting %.2f, results in %s",
        run.strategy, result["faa"], result["average_forgetting"], report.folder)
    return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunConfig.parse(context.run_config, source="run config")
    execute(run, run.run_name or f"run-{context.run_id}", lambda schedule: FCILStrategy(schedule).start(grid))
