"""End to end: a real federated FCIL run through Flower's simulation engine (SuperLink + Ray), 3 SuperNodes."""

import csv
import io
import json

import pytest

from deploy.processes import ROOT, flwr_run, run_status
from deploy.simulate import simulation_superlink

pytestmark = pytest.mark.simulation


def test_federated_fcil_run_through_flower(tmp_path):
    out_dir = tmp_path / "outputs"
    overrides = (
        "backbone='efficientnet_lite0' img-size=32 classes-per-task=5 num-tasks=2 rounds-per-task=2 local-epochs=2 "
        f"max-train-per-class=30 max-test-per-class=20 lr=0.003 rank=4 output-dir='{out_dir}' run-name='e2e'"
    )
    log = io.StringIO()
    with simulation_superlink(tmp_path / "link") as env:
        run_id = flwr_run(env, "sim", ROOT, overrides, ["--federation-config", "num-supernodes=3"], stream_to=log)
        status = run_status(env, "sim", run_id)
    assert status.startswith("finished:completed"), log.getvalue()[-4000:]

    folder = out_dir / "e2e"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [len(row) for row in metrics["acc_matrix"]] == [1, 2]  # lower triangle of a 2 x 2 matrix
    # 10 classes seen after two tasks: chance is 10%
    assert metrics["faa"] > 25.0, metrics
    with open(folder / "rounds.csv") as f:
        rounds = list(csv.DictReader(f))
    assert [(r["task"], r["round"], r["factor"]) for r in rounds] == [
        ("0", "0", "B"), ("0", "1", "A"), ("1", "0", "B"), ("1", "1", "A")
    ]
    assert {r["clients"] for r in rounds} == {"3"}  # every round merged all three clients
    for name in ("acc_matrix.csv", "acc_matrix.png", "faa.png", "state.pt", "config.json"):
        assert (folder / name).stat().st_size > 0, name
    assert "[task 2/2 done]" in log.getvalue()  # progress lines reach the user's terminal
