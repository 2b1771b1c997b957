"""Flower's own `flwr run .`, typed as the README tells a new user to type it.

The simulation test takes the README's plain-Flower command word for word and runs it through a shell with a
fresh Flower home (no config.toml: `flwr run` writes Flower's default one with its `local` connection), so
`flwr run` starts Flower's local simulation SuperLink itself, in the background. `flwr run` exits 0 even when
the run failed, so the test asks that SuperLink for the run's final status, then stops it (and whatever it
started) by FLWR_HOME. Only the job is made tiny (`--run-config`) and the local SuperLink's two ports are moved
to free ones (Flower's FLWR_LOCAL_* variables), so the test neither meets nor disturbs a SuperLink already on
39091/39093.

The fast test guards what made Flower's default runtime installation (`uv sync` of the app) fail: uv resolves
for every Python that `requires-python` allows, so it must not allow one that a dependency refuses.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import tomllib
from importlib import metadata

import psutil
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from deploy.processes import BIN, OFFLINE, ROOT, free_port, processes_under, run_status, stop_under

TINY_JOB = (
    "backbone='vit_tiny_test' img-size=32 num-tasks=1 rounds-per-task=1 local-epochs=1 "
    "max-train-per-class=6 max-test-per-class=4"
)


def readme_plain_flower_command() -> str:
    """The one `flwr run . --stream ...` code span of the README."""
    spans = set(re.findall(r"`([^`\n]*flwr run \. --stream[^`\n]*)`", (ROOT / "README.md").read_text()))
    assert len(spans) == 1, f"expected one plain-Flower command in README.md, found {sorted(spans)}"
    return spans.pop()


def test_readme_and_deployment_doc_give_the_same_plain_flower_command():
    command = readme_plain_flower_command()
    # Without it every run installs the app's dependencies from PyPI (docs/deployment.md, "Plain Flower").
    assert command.startswith("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . "), command
    assert command in (ROOT / "docs" / "deployment.md").read_text()


def _lowest_python(spec: SpecifierSet) -> str:
    return next(v for v in (f"3.{m}.{p}" for m in range(40) for p in range(40)) if spec.contains(v))


def test_requires_python_admits_no_python_that_a_dependency_refuses():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lowest = _lowest_python(SpecifierSet(project["requires-python"]))
    extras = project.get("optional-dependencies", {}).values()
    requirements = [*project["dependencies"], *(r for extra in extras for r in extra)]
    refused = {}
    for name in sorted({Requirement(r).name for r in requirements}):
        theirs = metadata.metadata(name).get("Requires-Python") or ""
        # Lower bounds only: uv ignores upper bounds on a dependency's Requires-Python.
        floor = SpecifierSet(",".join(str(s) for s in SpecifierSet(theirs) if s.operator not in ("<", "<=")))
        if not floor.contains(lowest):
            refused[name] = theirs
    assert not refused, f"requires-python allows {lowest}, which these dependencies refuse: {refused}"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.simulation
def test_readme_plain_flower_command_runs_to_completion(tmp_path):
    command = readme_plain_flower_command()
    home = tmp_path / "flwr-home"  # does not exist yet: a fresh Flower home
    out_dir = tmp_path / "outputs"
    http_port = free_port()
    control_port = next(p for p in iter(free_port, None) if p != http_port)
    # Nothing Flower-related from the caller's environment: only the command's own variable counts.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")} | OFFLINE | {
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # as in the activated venv
        "VIRTUAL_ENV": str(BIN.parent),
    }
    line = f"{command} --run-config {shlex.quote(f'{TINY_JOB} output-dir={str(out_dir)!r}')}"
    proc = subprocess.Popen(["bash", "-c", line], cwd=ROOT, env=env, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        try:
            output, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"`{line}` still running after 600 s:\n{output[-4000:]}")
        started = re.search(r"Successfully started run (\d+)", output)
        assert started, f"`flwr run` started no run (exit code {proc.returncode}):\n{output[-4000:]}"
        run_id = started.group(1)
        status = run_status(env, "local", run_id)
        # `flwr run .` returned, and the SuperLink it started is still there, as the README says.
        left = []
        for p in processes_under(home):
            try:
                left.append(" ".join(p.cmdline()))
            except psutil.Error:
                pass
        assert any("flower-superlink" in c and f"--port {http_port}" in c for c in left), left
    finally:
        stop_under(home)
    log = output + ((home / "local-superlink" / "superlink.log").read_text(errors="replace")
                    if (home / "local-superlink" / "superlink.log").exists() else "")
    assert status.startswith("finished:completed"), f"{status}\n{log[-6000:]}"
    assert "Installing application dependencies" not in output  # the variable took effect: nothing from PyPI
    assert len(list(out_dir.rglob("metrics.json"))) == 1, sorted(map(str, out_dir.rglob("*")))
    assert processes_under(home) == [], "a process of the run outlived stop_under"
    assert not _port_open(http_port) and not _port_open(control_port)
