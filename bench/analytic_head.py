"""A closed-form head over every class seen (common/analytic.py) on a method's merged backbone: how much of what
the method loses is its trained heads', and what the drift of the backbone between tasks costs (issue 15).

    python bench/analytic_head.py                                   # lorm and fedavg-lora, beta 0.5, seed 0
    python bench/analytic_head.py --strategies lorm --betas 0.5 0.1 --seeds 3 --rp-dim 2000

Every run goes in process with ``--clients`` clients (deploy/inprocess.py: the server and client code of a Flower
run, without its transport), with the run config's defaults plus ``--run-config``; at each task end the merged
backbone delta it evaluates is kept. Three heads are then scored after each task t, all on that backbone:
- trained: the run's own (each task's block trained by the clients and merged by the method);
- analytic: a ridge regression over every class seen, from the sums each task's clients would add at its own
  task end, through the merged backbone of that time: what a federated analytic head has (the sums of earlier
  tasks were taken through older backbones);
- oracle: the same with every task's sums taken again through the backbone after t. It needs the old data, so no
  federated run can have it: the gap to "analytic" is what the drift costs.
- w0: the analytic head on the pre-trained backbone alone (no LoRA delta, for its sums and its evaluation): no
  drift by construction, and what the method's backbone training adds over a frozen backbone.
Sums over the clients' partitions equal the sums over the union of their data (tests/test_analytic.py), so they
are computed over that union. The head input is the backbone's features, or ``relu(features P)`` with a fixed
seeded Gaussian P (RanPAC's random projection) when ``--rp-dim`` > 0.

The ridge is chosen without the test split: each ``--ridges`` value is scored on a validation run (the first seed,
``validation-fraction`` of every class's training samples held out), the best kept for every test run.
Writes <out>/analytic.csv (one row per run and head) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from flwr.common.config import parse_config_args

from common import training
from common.analytic import HeadSums, RandomFeatures, feature_sums, ridge_head
from common.config import RunConfig
from common.data import client_task_indices
from common.experiment import Experiment, stable_seed
from common.lora import set_deltas
from common.metrics import (
    accuracy_per_task, average_accuracy, average_forgetting, square_matrix, task_aware_accuracy_per_task,
)
from deploy.inprocess import InProcessTransport, run_in_process, schedule_for
from deploy.processes import ROOT

HEADS = ("trained", "analytic", "oracle", "w0")


def run_with_deltas(run: RunConfig, clients: int) -> tuple[Experiment, list[list[float]], list[list[float]], list[dict]]:
    """(experiment, the run's accuracy matrix, its task-aware matrix, the delta evaluated after each task)."""
    deltas: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        schedule = schedule_for(run, Path(folder) / "run")
        schedule.task_end_observers.append(lambda task, d: deltas.append({k: v.clone() for k, v in d.items()}))
        state = run_in_process(schedule, InProcessTransport(run, clients))
    return schedule.exp, state.acc, state.task_aware, deltas


@torch.no_grad()
def head_inputs(exp: Experiment, delta: dict, dataset, indices: np.ndarray, P: torch.Tensor | None,
                rf: RandomFeatures | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(head inputs (n, p) float64, labels (n,)) of ``dataset[indices]`` through W0 + ``delta``."""
    model = exp.model
    set_deltas(model, {k: v.to(torch.float32) for k, v in delta.items()}, adapter_scale=0.0)
    try:
        loader = training.make_loader(dataset, indices, exp.run.eval_batch_size, shuffle=False, seed=0)
        x, y = training.head_inputs(model, loader, device=exp.device)
    finally:
        set_deltas(model, None, adapter_scale=1.0)
    return (rf(x, P).double() if rf else x), y


def task_train_indices(exp: Experiment, task: int, clients: int) -> np.ndarray:
    r = exp.run
    return np.unique(np.concatenate([
        client_task_indices(exp.stream, task, pid, clients, r.beta, r.seed) for pid in range(clients)
    ]))


def analytic_matrices(exp: Experiment, deltas: list[dict], clients: int, ridges: list[float], rp_dim: int,
                      oracle: bool = True) -> dict[tuple[str, float], tuple[list[list[float]], list[list[float]]]]:
    """(head, ridge) -> (accuracy matrix, task-aware matrix) for the analytic head and, with ``oracle``, the
    oracle head (which passes every earlier task's data again at each task end)."""
    d = exp.model.head.in_features
    rf = RandomFeatures(d, rp_dim, seed=stable_seed(exp.run.seed, 11)) if rp_dim else None
    P = rf.matrix if rf else None
    p, num_classes = (rp_dim or d), exp.model.head.out_features
    test_labels = np.asarray(exp.stream.test_labels)
    federated = HeadSums.zeros(p, num_classes)
    heads = ("analytic", "oracle") if oracle else ("analytic",)
    out = {(h, lam): ([], []) for h in heads for lam in ridges}
    for t, delta in enumerate(deltas):
        tasks = exp.tasks[: t + 1]
        seen = exp.block(t)[1]
        train = exp.head_sums_data(t)  # the images a run's clients pass at t's end (client/local.py:head_sums)
        x, y = head_inputs(exp, delta, train, task_train_indices(exp, t, clients), P, rf)
        federated.add(*feature_sums(x, y, num_classes), len(y))
        sums_of = {"analytic": federated}
        if oracle:
            sums_of["oracle"] = again = HeadSums.zeros(p, num_classes)
            for j in range(t + 1):
                xj, yj = (x, y) if j == t else head_inputs(exp, delta, train, task_train_indices(exp, j, clients), P, rf)
                again.add(*feature_sums(xj, yj, num_classes), len(yj))
        test_idx = np.flatnonzero(np.isin(test_labels, np.concatenate([np.asarray(c) for c in tasks])))
        xt, yt = head_inputs(exp, delta, exp.stream.test, test_idx, P, rf)
        for head, sums in sums_of.items():
            for lam in ridges:
                logits = (xt @ ridge_head(sums, lam, classes=seen).T).numpy()
                acc, aware = out[(head, lam)]
                acc.append(accuracy_per_task(logits.argmax(1), yt.numpy(), tasks))
                aware.append(task_aware_accuracy_per_task(logits, yt.numpy(), tasks))
    return out


def score(acc: list[list[float]], aware: list[list[float]]) -> dict:
    return {"faa": average_accuracy(square_matrix(acc)), "forgetting": average_forgetting(square_matrix(acc)),
            "task_aware_faa": average_accuracy(square_matrix(aware)), "final_row": " ".join(f"{a:.1f}" for a in acc[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=["lorm", "fedavg-lora"])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.5])
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 for the test runs")
    parser.add_argument("--ridges", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0, 10.0])
    parser.add_argument("--rp-dim", type=int, default=0, help="random projection + ReLU to this many features")
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--run-config", default="", help="overrides for every run, e.g. \"num-tasks=2\"")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "analytic")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for strategy in args.strategies:
        for beta in args.betas:
            def config(seed: int, extra: str = "") -> RunConfig:
                text = f"strategy='{strategy}' beta={beta} seed={seed} {args.run_config} {extra}"
                return RunConfig.parse(parse_config_args([text]), source="--run-config")

            exp, _, _, deltas = run_with_deltas(config(0, f"validation-fraction={args.validation_fraction}"),
                                                args.clients)
            on_validation = analytic_matrices(exp, deltas, args.clients, args.ridges, args.rp_dim)
            faa = {lam: score(*on_validation[("analytic", lam)])["faa"] for lam in args.ridges}
            ridge = max(args.ridges, key=faa.get)
            print(f"{strategy} beta {beta}: validation FAA by ridge "
                  + ", ".join(f"{lam:g}: {v:.2f}" for lam, v in faa.items()) + f" -> ridge {ridge:g}", flush=True)
            for seed in range(args.seeds):
                exp, acc, aware, deltas = run_with_deltas(config(seed), args.clients)
                heads = {"trained": (acc, aware)}
                heads |= {h: m for (h, lam), m in
                          analytic_matrices(exp, deltas, args.clients, [ridge], args.rp_dim).items()}
                frozen = [{k: torch.zeros_like(v) for k, v in d.items()} for d in deltas]
                # with no delta the backbone never moves: the oracle would be the analytic head, passed again
                heads["w0"] = analytic_matrices(exp, frozen, args.clients, [ridge], args.rp_dim,
                                                oracle=False)[("analytic", ridge)]
                for head in HEADS:
                    row = {"strategy": strategy, "beta": beta, "seed": seed, "head": head,
                           "ridge": "" if head == "trained" else ridge, "rp_dim": args.rp_dim} | score(*heads[head])
                    rows.append(row)
                    print(" ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                          flush=True)
    with open(args.out / "analytic.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n| strategy | beta | head | FAA % (mean over seeds) | forgetting | task-aware FAA |\n|---|---|---|---|---|---|")
    for key in dict.fromkeys((r["strategy"], r["beta"], r["head"]) for r in rows):
        group = [r for r in rows if (r["strategy"], r["beta"], r["head"]) == key]
        mean = {k: statistics.mean(r[k] for r in group) for k in ("faa", "forgetting", "task_aware_faa")}
        spread = f" ± {statistics.stdev(r['faa'] for r in group):.2f}" if len(group) > 1 else ""
        print(f"| {key[0]} | {key[1]} | {key[2]} | {mean['faa']:.2f}{spread} | {mean['forgetting']:.2f} | "
              f"{mean['task_aware_faa']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
