"""Every strategy runs the whole schedule on the same clients; what each one sends matches its method."""

import pytest
import torch

from common.config import RunConfig
from common.methods import METHODS
from deploy.inprocess import InProcessTransport, strategy_for

BASE = dict(
    backbone="vit_tiny_test", img_size=32, classes_per_task=5, num_tasks=2, rounds_per_task=2, local_epochs=1,
    max_train_per_class=6, max_test_per_class=4, rank=2, alpha_head=0.5, seed=1,
)


@pytest.mark.parametrize("strategy", sorted(METHODS))
def test_each_strategy_runs_the_schedule(strategy, tmp_path):
    run = RunConfig(strategy=strategy, **BASE)
    state = strategy_for(run, tmp_path / strategy).run_schedule(InProcessTransport(run, 2))
    assert [len(row) for row in state.acc] == [1, 2]
    assert all(0.0 <= a <= 100.0 for row in state.acc for a in row)
    assert [h["factor"] for h in state.history] == run.factor_schedule * 2
    assert all(torch.isfinite(t).all() for a, b in state.past for t in [*a.values(), *b.values()])
    # past deltas: LoRM and the averaging baselines keep one adapter per task; RegMean one per round
    assert len(state.past) == (4 if strategy == "regmean" else 2)


def test_uplink_reflects_what_each_method_needs(tmp_path):
    up = {}
    for strategy in ("lorm", "fedavg-lora", "ffa-lora"):
        run = RunConfig(strategy=strategy, **(BASE | {"num_tasks": 1}))
        state = strategy_for(run, tmp_path / strategy).run_schedule(InProcessTransport(run, 2))
        up[strategy] = [h["uplink_bytes_per_client"] for h in state.history]
    # FFA-LoRA sends only B; FedAvg-LoRA both factors; neither sends Grams
    assert up["ffa-lora"][0] < up["fedavg-lora"][0]
    # LoRM's B-round carries B, the r x r projections and the head's Gram: more than FFA-LoRA's B alone
    assert up["lorm"][0] > up["ffa-lora"][0]
