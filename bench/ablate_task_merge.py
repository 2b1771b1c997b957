"""How a finished LoRM run's task deltas combine: the paper's RegMean ``S H^+`` against their mean and their sum.

    python bench/ablate_task_merge.py outputs/compare-tuned/runs/lorm-beta0.5-val-lr-1e-3-alpha-head-0

Loads the run's config and final checkpoint, keeps its merged head, and evaluates the backbone three ways on the
split the run was evaluated on (its validation hold-out when it had one): W0 + S H^+ (what LoRM reports),
W0 + mean_tau(B_tau A_tau) and W0 + sum_tau(B_tau A_tau) (what the summing baselines train and evaluate). Prints
class-incremental and task-aware accuracy per task for each. A diagnostic of where accuracy goes, not a method:
nothing here changes a run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common.config import RunConfig
from common.experiment import build_experiment
from common.merges import TaskSums, delta_sum
from server.evaluation import evaluate_seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished LoRM run folder (config.json + state.pt)")
    args = parser.parse_args()
    run = RunConfig.parse(json.loads((args.run / "config.json").read_text()), source=str(args.run / "config.json"))
    if not run.method.task_end_grams:
        raise SystemExit(f"{args.run} is a {run.strategy} run: it keeps no cross-task Gram sums to ablate")
    state = torch.load(args.run / "state.pt", map_location="cpu", weights_only=True)
    exp = build_experiment(run, run.data_dir, "cpu", "")
    if state["task"] != len(exp.tasks):
        raise SystemExit(f"{args.run} stopped at task {state['task']} of {len(exp.tasks)}: not finished")
    past = state["past"]
    sums = state["sums"]
    ways = {
        "S H^+ (LoRM)": TaskSums(sums["S"], sums["H"]).delta(run.ridge),
        "mean of deltas": {k: v / len(past) for k, v in delta_sum(past, exp.shapes, dtype=torch.float64).items()},
        "sum of deltas": delta_sum(past, exp.shapes, dtype=torch.float64),
    }
    split = f"validation hold-out ({run.validation_fraction:.0%} of training)" if run.validation_fraction else "test"
    print(f"{args.run.name}: {len(exp.tasks)} tasks, evaluated on the {split} split")
    for name, deltas in ways.items():
        acc, aware = evaluate_seen(exp, deltas, state["head_weight"], state["head_bias"], upto_task=len(exp.tasks) - 1)
        print(f"{name:>16}: class-incremental {' '.join(f'{a:5.1f}' for a in acc)} -> {sum(acc) / len(acc):5.2f} | "
              f"task-aware {' '.join(f'{a:5.1f}' for a in aware)} -> {sum(aware) / len(aware):5.2f}")


if __name__ == "__main__":
    main()
