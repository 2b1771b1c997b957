"""LoRM ServerApp: validates the run config, builds the evaluation model and runs the LoRM strategy."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig, resolve_device
from common.experiment import build_experiment
from server.report import RunReport
from server.secagg import SecAggLoRMStrategy
from server.state import config_fingerprint
from server.strategy import LoRMStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunConfig.parse(context.run_config, source="run config")
    device = resolve_device(run.device)
    name = run.run_name or f"run-{context.run_id}"
    report = RunReport(Path(run.output_dir).expanduser().resolve() / name)
    settings = run.model_dump(by_alias=True)
    report.write_config(settings)
    log(INFO, "LoRM run %s: results in %s (device %s)", name, report.folder, device)

    started = time.perf_counter()
    exp = build_experiment(run, run.data_dir, device)
    # Only settings that change results enter the fingerprint: a resumed run may get a new timeout or folder.
    fingerprint = config_fingerprint(
        {k: v for k, v in settings.items() if k not in ("round-timeout", "output-dir", "run-name", "device")}
    )
    strategy_cls = SecAggLoRMStrategy if run.privacy == "secagg" else LoRMStrategy
    strategy = strategy_cls(exp, report, fingerprint, merge_device=device)
    state = strategy.start(grid)
    result = report.write_results(state.acc, {"tasks_done": len(state.acc), "wall_s": time.perf_counter() - started})
    log(INFO, "LoRM finished: FAA %.2f%%, average forgetting %.2f, results in %s",
        result["faa"], result["average_forgetting"], report.folder)
