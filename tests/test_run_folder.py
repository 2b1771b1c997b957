"""The run folder: one run at a time (a lock), and nothing in it overwritten by a run that is refused at
start-up or that has nothing left to do; config.json and metrics.json replaced whole or not at all; a resumed
run's wall time adds up its sessions."""

import json
import os

import pytest
import torch

from common.config import RunConfig
from deploy.inprocess import InProcessTransport, run_in_process
import server.report as report_module
from server.report import RunLocked, RunReport
from server.server_app import execute
from server.state import CheckpointError

RUN = RunConfig(
    backbone="vit_tiny_test", img_size=32, classes_per_task=5, num_tasks=2, rounds_per_task=1, local_epochs=1,
    max_train_per_class=4, max_test_per_class=2, rank=2, min_clients=2, seed=5,
)
K = 2


def in_process(run, calls=None):
    def drive(schedule):
        calls is not None and calls.append(1)
        return run_in_process(schedule, InProcessTransport(run, K))
    return drive


def test_a_second_process_on_the_same_run_folder_waits_then_is_refused_naming_the_holder(tmp_path, monkeypatch,
                                                                                         caplog):
    monkeypatch.setattr(report_module, "LOCK_WAIT_S", 0.6)
    report = RunReport(tmp_path / "busy")
    with report.locked():
        with pytest.raises(RunLocked, match=r"run folder .*busy is in use by another run \(pid \d+\)"):
            with RunReport(tmp_path / "busy").locked():
                pass
        with pytest.raises(RunLocked):
            execute(RUN.model_copy(update={"output_dir": str(tmp_path)}), "busy", in_process(RUN))
    assert "run folder" in caplog.text and "waiting up to 1 s for it to end" in caplog.text
    with RunReport(tmp_path / "busy").locked():  # released with the first holder
        pass


def test_refused_or_idle_runs_leave_the_folder_as_it_was(tmp_path):
    run = RUN.model_copy(update={"output_dir": str(tmp_path)})
    first = execute(run, "r", in_process(run))
    folder = tmp_path / "r"
    saved = {name: (folder / name).read_bytes() for name in ("config.json", "metrics.json", "rounds.csv")}
    assert json.loads(saved["config.json"])["rank"] == 2

    other = RUN.model_copy(update={"output_dir": str(tmp_path), "rank": 3})  # changes results: refused
    with pytest.raises(CheckpointError, match="other settings"):
        execute(other, "r", in_process(other))
    calls = []
    again = execute(run, "r", in_process(run, calls))  # finished: nothing to do
    assert calls == [] and again == first
    assert {name: (folder / name).read_bytes() for name in saved} == saved


def test_a_resumed_run_adds_up_the_wall_time_of_its_sessions(tmp_path):
    run = RUN.model_copy(update={"output_dir": str(tmp_path)})

    class Crash(Exception):
        pass

    class Cut(InProcessTransport):
        def exchange(self, *args):
            if self.calls == 3:  # after the start-up check, task 0's round and its task end (checkpointed)
                raise Crash()
            return super().exchange(*args)

    with pytest.raises(Crash):
        execute(run, "cut", lambda schedule: run_in_process(schedule, Cut(run, K)))
    first_session = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert first_session["tasks_done"] == 1
    spent = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)["wall_s"]
    assert spent > 0
    result = execute(run, "cut", in_process(run))
    assert result["tasks_done"] == 2 and result["wall_s"] > spent


def test_a_crash_while_the_json_files_are_rewritten_leaves_the_previous_ones_whole(tmp_path, monkeypatch):
    report = RunReport(tmp_path / "r")
    report.write_config({"rank": 2})
    report.write_results([[50.0]], [10], {"wall_s": 1.0})
    saved = {name: (report.folder / name).read_bytes() for name in ("config.json", "metrics.json")}

    def crash(*args):  # the process dies after writing the new contents, before they replace the old
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        report.write_config({"rank": 3})
    with pytest.raises(OSError, match="killed"):
        report.write_results([[60.0]], [10], {"wall_s": 2.0})
    assert {name: (report.folder / name).read_bytes() for name in saved} == saved
