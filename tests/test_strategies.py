"""Every strategy runs the whole schedule on the same clients; what each one sends matches its method."""

import pytest
import torch

from common.config import RunConfig
from common.methods import METHODS
from common.methods.base import CrossTask
from deploy.inprocess import InProcessTransport, run_in_process, schedule_for

BASE = dict(
    backbone="vit_tiny_test", img_size=32, classes_per_task=5, num_tasks=2, rounds_per_task=2, local_epochs=1,
    max_train_per_class=6, max_test_per_class=4, rank=2, alpha_head=0.5, seed=1,
)


@pytest.mark.parametrize("strategy", sorted(METHODS))
def test_each_strategy_runs_the_schedule(strategy, tmp_path):
    run = RunConfig(strategy=strategy, **BASE)
    state = run_in_process(schedule_for(run, tmp_path / strategy), InProcessTransport(run, 2))
    assert [len(row) for row in state.acc] == [1, 2]
    assert all(0.0 <= a <= 100.0 for row in state.acc for a in row)
    # knowing the task can only help: a right global argmax is right within the task's block too
    assert [len(row) for row in state.task_aware] == [1, 2]
    assert all(aware >= acc for r, ra in zip(state.acc, state.task_aware) for acc, aware in zip(r, ra))
    assert [h["factor"] for h in state.history] == run.method.schedule(run.rounds_per_task) * 2
    assert all(torch.isfinite(t).all() for a, b in state.past for t in [*a.values(), *b.values()])
    # A method's task end adds the task's adapter to the past, or nothing when each round's merge finished a
    # delta already (RegMean): asked of the method, so a new method of either kind needs no edit here.
    adds = len(run.method.end_task(({}, {}), CrossTask(), {}).past)
    assert len(state.past) == run.num_tasks * (run.rounds_per_task if adds == 0 else adds)


def test_uplink_reflects_what_each_method_needs(tmp_path):
    up = {}
    for strategy in ("lorm", "fedavg-lora", "ffa-lora"):
        run = RunConfig(strategy=strategy, **(BASE | {"num_tasks": 1}))
        state = run_in_process(schedule_for(run, tmp_path / strategy), InProcessTransport(run, 2))
        up[strategy] = [h["uplink_bytes_per_client"] for h in state.history]
    # FFA-LoRA sends only B; FedAvg-LoRA both factors; neither sends Grams
    assert up["ffa-lora"][0] < up["fedavg-lora"][0]
    # LoRM's B-round carries B, the r x r projections and the head's Gram: more than FFA-LoRA's B alone
    assert up["lorm"][0] > up["ffa-lora"][0]


def test_compare_tuning_picks_the_best_validation_value_and_never_the_test_split(monkeypatch, tmp_path):
    import argparse

    import bench.compare_strategies as cs

    seen = []

    def fake_run_one(name, strategy, beta, overrides, out, supernodes, in_process):
        seen.append(overrides)
        lr = float(overrides.split("lr=")[1].split()[0])
        return {"strategy": strategy, "beta": beta, "chosen": "", "faa": {1e-3: 10.0, 3e-3: 30.0, 1e-2: 30.0}[lr],
                "forgetting": 0.0}

    monkeypatch.setattr(cs, "run_one", fake_run_one)
    args = argparse.Namespace(run_config="img-size=32", validation_fraction=0.3, out=tmp_path, supernodes=3,
                              in_process=True)
    best, rows = cs.tune("lorm:alpha-head=0", 0.5, [("lr", ["1e-3", "3e-3", "1e-2"])], args)
    assert best == "lr=3e-3"  # the first of the tied best
    assert all("validation-fraction=0.3" in o for o in seen) and [r["chosen"] for r in rows] == [
        "lr=1e-3", "lr=3e-3", "lr=1e-2"]
    assert cs.parse_strategy("lorm:alpha-head=0 rank=8") == ("lorm", "alpha-head=0 rank=8")
    with pytest.raises(argparse.ArgumentTypeError):
        cs.parse_strategy("fedprox")
    assert cs.parse_tune("lr=1e-3, 3e-3") == ("lr", ["1e-3", "3e-3"])
    tunes = [("lr", ["1e-3", "3e-3"]), ("alpha-head", ["0", "0.5"])]
    assert cs.grid("lorm", tunes) == ["lr=1e-3 alpha-head=0", "lr=1e-3 alpha-head=0.5", "lr=3e-3 alpha-head=0",
                                      "lr=3e-3 alpha-head=0.5"]
    assert cs.grid("fedavg-lora", tunes) == ["lr=1e-3", "lr=3e-3"]  # sends no Grams: alpha-head changes nothing


def test_compare_rows_average_the_seeds():
    import bench.compare_strategies as cs

    base = {"strategy": "lorm", "beta": 0.5, "chosen": "", "task_aware_faa": 60.0, "forgetting": 1.0, "wall_s": 10.0,
            "uplink_kB": 1.0, "downlink_kB": 2.0, "merge_ms": 3.0, "faa_pooled": 31.0, "forgetting_after_learning": 0.5}
    runs = [base | {"faa": 30.0, "final_acc_per_task": [10.0, 50.0], "faa_per_task": [80.0, 30.0]},
            base | {"faa": 36.0, "final_acc_per_task": [20.0, 52.0], "faa_per_task": [70.0, 36.0]}]
    row = cs.aggregate(runs)
    assert row["faa"] == 33.0 and row["seeds"] == 2 and row["faa_std"] == pytest.approx(18**0.5)
    assert row["final_acc_per_task"] == [15.0, 51.0] and row["faa_per_task"] == [75.0, 33.0]
    assert cs.aggregate(runs[:1])["faa_std"] == 0.0


def test_compare_tuning_skips_a_strategy_that_no_tuned_setting_changes(monkeypatch, tmp_path):
    import argparse

    import bench.compare_strategies as cs

    monkeypatch.setattr(cs, "run_one", lambda *a, **k: pytest.fail("no validation run is needed"))
    args = argparse.Namespace(run_config="", validation_fraction=0.3, out=tmp_path, supernodes=3, in_process=True)
    assert cs.tune("ffa-lora", 0.5, [("alpha-head", ["0", "0.5"])], args) == ("", [])


def test_paired_difference_and_its_interval_by_hand():
    import math

    import bench.compare_strategies as cs

    mean, low, high = cs.paired_difference([50.0, 60.0, 55.0], [48.0, 57.0, 55.0])  # differences 2, 3, 0
    half = 4.302652729911275 * math.sqrt(7 / 3) / math.sqrt(3)  # t(0.975, 2 df) * sd / sqrt(n)
    assert mean == pytest.approx(5 / 3) and (low, high) == pytest.approx((5 / 3 - half, 5 / 3 + half))
    assert cs.paired_difference([50.0], [40.0]) == (10.0, -math.inf, math.inf)
    rows = [{"strategy": "lorm", "beta": 0.5, "faa_seeds": [1.0, 2.0]},
            {"strategy": "ffa-lora", "beta": 0.5, "faa_seeds": [2.0, 4.0]},
            {"strategy": "ffa-lora", "beta": 0.1, "faa_seeds": [2.0, 4.0]}]
    cs.add_paired_differences(rows, "lorm")
    assert rows[0]["diff"] is None and rows[1]["diff"][0] == 1.5 and rows[2]["diff"] is None


def test_default_comparison_rows_are_valid_run_configs():
    """Each default row's settings go through Flower's own --run-config parser and the run config's checks."""
    from flwr.common.config import parse_config_args

    import bench.compare_strategies as cs

    for spec in cs.DEFAULT_STRATEGIES:
        name, extra = cs.parse_strategy(spec)
        RunConfig.parse({"strategy": name} | parse_config_args([extra] if extra else []), source=spec)
