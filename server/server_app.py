"""LoRM ServerApp: validates the run config, builds the evaluation model and runs the strategy's schedule."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path
from collections.abc import Callable
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig, resolve_device
from common.experiment import build_experiment
from server.report import RunReport
from server.schedule import Schedule
from server.state import ServerState, config_fingerprint
from server.strategy import FCILStrategy

app = ServerApp()


def execute(run: RunConfig, name: str, drive: Callable[[Schedule], ServerState]) -> dict[str, Any]:
    """The whole run (or the rest of it, from its checkpoint); returns metrics.json's content.

    ``drive`` runs the schedule: over Flower (``FCILStrategy(schedule).start(grid)``) or in process.
    """
    device = resolve_device(run.device)
    report = RunReport(Path(run.output_dir).expanduser().resolve() / name)
    settings = run.model_dump(by_alias=True)
    report.write_config(settings)
    log(INFO, "%s run %s: results in %s (device %s)", run.strategy, name, report.folder, device)
    started = time.perf_counter()
    exp = build_experiment(run, run.data_dir, device)
    # Only settings that change results enter the fingerprint: a resumed run may get a new timeout or folder.
    fingerprint = config_fingerprint(
        {k: v for k, v in settings.items() if k not in ("round-timeout", "output-dir", "run-name", "device")}
    )
    state = drive(Schedule(exp, report, fingerprint, merge_device=device))
    result = report.write_results(
        state.acc, {"tasks_done": len(state.acc), "wall_s": time.perf_counter() - started}, state.task_aware
    )
    log(INFO, "%s finished: FAA %.2f%%, average forgetting %.2f, results in %s",
        run.strategy, result["faa"], result["average_forgetting"], report.folder)
    return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunConfig.parse(context.run_config, source="run config")
    execute(run, run.run_name or f"run-{context.run_id}", lambda schedule: FCILStrategy(schedule).start(grid))
