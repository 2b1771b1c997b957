"""deploy.local's failure paths end with a message, never a traceback: a SuperLink that died with the run (so
`flwr ls` cannot answer) is reported with how to resume the run."""

import subprocess
from contextlib import contextmanager

import deploy.local as local
import deploy.processes as processes


def test_a_superlink_that_cannot_answer_is_a_runtime_error_not_a_called_process_error(monkeypatch):
    def refused(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Connection refused")

    monkeypatch.setattr(processes.subprocess, "run", refused)
    try:
        processes.run_status({}, "deploy", "42")
    except RuntimeError as err:
        assert "could not tell the status of run 42 (is it down?)" in str(err) and "Connection refused" in str(err)
    else:
        raise AssertionError("no error")


def test_deploy_local_ends_with_a_message_and_the_way_to_resume(monkeypatch, tmp_path, capsys):
    @contextmanager
    def deployment(*args, **kwargs):
        yield type("Dep", (), {"env": {}, "connection": "deploy"})()

    def superlink_gone(*args):
        raise RuntimeError("the SuperLink could not tell the status of run 7 (is it down?)")

    monkeypatch.setattr(local, "local_deployment", deployment)
    monkeypatch.setattr(local, "flwr_run", lambda *args, **kwargs: "7")
    monkeypatch.setattr(local, "run_status", superlink_gone)
    assert local.main(["--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "[deploy] failed: the SuperLink could not tell the status of run 7" in err
    assert "submit it again with the same run-name" in err and "Traceback" not in err

    monkeypatch.setattr(local, "run_status", lambda *args: "finished:failed")
    assert local.main(["--workdir", str(tmp_path)]) == 1
    assert "resumes from its last checkpoint" in capsys.readouterr().err
