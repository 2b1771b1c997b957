"""How a finished run's task deltas combine: LoRM's RegMean ``S H^+`` against their mean and their sum, and each
task on its own delta (the upper bound a single merged backbone gives up).

    python bench/ablate_task_merge.py outputs/compare-tuned/runs/lorm-beta0.5-val-lr-1e-3-alpha-head-0

Loads the run's config and final checkpoint, keeps its merged head, and evaluates the backbone three ways on the
split the run was evaluated on (its validation hold-out when it had one): W0 + S H^+ (what LoRM reports),
W0 + mean_tau(B_tau A_tau) and W0 + sum_tau(B_tau A_tau) (what the summing baselines train and evaluate). Prints
class-incremental and task-aware accuracy per task for each, then each task j on W0 + B_j A_j alone. A diagnostic
of where accuracy goes, not a method: nothing here changes a run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common.config import RunConfig
from common.experiment import Experiment, build_experiment
from common.merges import TaskSums, delta_sum
from server.evaluation import evaluate_seen


def load_finished(folder: Path) -> tuple[RunConfig, dict, Experiment]:
    """A finished run's config, final checkpoint and experiment (built on the CPU)."""
    run = RunConfig.parse(json.loads((folder / "config.json").read_text()), source=str(folder / "config.json"))
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    exp = build_experiment(run, run.data_dir, "cpu", "")
    if state["task"] != len(exp.tasks):
        raise SystemExit(f"{folder} stopped at task {state['task']} of {len(exp.tasks)}: not finished")
    return run, state, exp


def ways(run: RunConfig, state: dict, exp: Experiment) -> dict[str, dict[str, torch.Tensor]]:
    """The backbone deltas compared: S H^+ (when the run kept the sums), the mean and the sum of the deltas."""
    past, out = state["past"], {}
    if state["sums"]["S"]:
        out["S H^+ (LoRM)"] = TaskSums(state["sums"]["S"], state["sums"]["H"]).delta(run.ridge)
    total = delta_sum(past, exp.shapes, dtype=torch.float64)
    return out | {"mean of deltas": {k: v / len(past) for k, v in total.items()}, "sum of deltas": total}


def own_delta(state: dict, exp: Experiment) -> tuple[list[float], list[float]]:
    """Each task j evaluated on W0 + its own delta B_j A_j with the final head: (class-incremental accuracy over
    all classes seen, task-aware accuracy within its block) per task. The upper bound of what merging the task
    deltas into one backbone gives up; needs one past adapter per task."""
    if len(state["past"]) != len(exp.tasks):
        raise ValueError(f"{len(state['past'])} past deltas for {len(exp.tasks)} tasks: not one per task")
    acc, aware = [], []
    for j, adapter in enumerate(state["past"]):
        row, aware_row = evaluate_seen(exp, delta_sum([adapter], exp.shapes, dtype=torch.float64),
                                       state["head_weight"], state["head_bias"], upto_task=len(exp.tasks) - 1)
        acc.append(row[j])
        aware.append(aware_row[j])
    return acc, aware


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run folder (config.json + state.pt)")
    args = parser.parse_args()
    run, state, exp = load_finished(args.run)
    split = f"validation hold-out ({run.validation_fraction:.0%} of training)" if run.validation_fraction else "test"
    print(f"{args.run.name}: {len(exp.tasks)} tasks, evaluated on the {split} split")
    for name, deltas in ways(run, state, exp).items():
        acc, aware = evaluate_seen(exp, deltas, state["head_weight"], state["head_bias"], upto_task=len(exp.tasks) - 1)
        print(f"{name:>16}: class-incremental {' '.join(f'{a:5.1f}' for a in acc)} -> {sum(acc) / len(acc):5.2f} | "
              f"task-aware {' '.join(f'{a:5.1f}' for a in aware)} -> {sum(aware) / len(aware):5.2f}")
    if len(state["past"]) == len(exp.tasks):
        acc, aware = own_delta(state, exp)
        print(f"{'own delta':>16}: class-incremental {' '.join(f'{a:5.1f}' for a in acc)} -> "
              f"{sum(acc) / len(acc):5.2f} | task-aware {' '.join(f'{a:5.1f}' for a in aware)} -> "
              f"{sum(aware) / len(aware):5.2f}")


if __name__ == "__main__":
    main()
