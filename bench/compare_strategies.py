"""LoRM against FedAvg-LoRA, FFA-LoRA and RegMean on the same run: one table, one plot.

    python bench/compare_strategies.py                          # offline default, beta 0.5 and 0.1
    python bench/compare_strategies.py --betas 0.5 --run-config "num-tasks=2"
    python bench/compare_strategies.py --tune "lr=1e-3,3e-3,1e-2"  # each strategy's lr chosen on validation
    python bench/compare_strategies.py --tune "lr=1e-3,3e-3" --tune "alpha-head=0,0.5"   # a grid
    python bench/compare_strategies.py --strategies lorm "lorm:alpha-head=0" fedavg-lora   # a variant row
    python bench/compare_strategies.py --seeds 3          # each row: mean +- std over 3 seeds

Every strategy runs as a real Flower simulation (deploy/simulate.py) with the run config's defaults from
pyproject.toml plus the overrides given, so the seed, the splits and the backbone are the same for all of them.
``--in-process`` runs the same server and client code in this one process instead (deploy/inprocess.py): same
merges and bytes, no Flower transport or process start-up, a fraction of the time on a small machine.
Writes <out>/table.md, <out>/table.csv and <out>/faa.png; a run that fails stops the comparison with its status.
Finished runs are reused (delete <out>/runs/<name> to redo one).

``--tune KEY=V1,V2,...`` (repeatable: a grid) chooses settings separately for every strategy and beta without
looking at the test split: each combination runs with ``validation-fraction`` of every class's training samples held out (the test split is not
loaded into the evaluation), the combination with the best validation FAA (the first on ties) is kept, and the
table's run then trains on all training samples with it and is evaluated on the test split. The validation FAA
of every combination goes to <out>/tuning.md (tuning uses the first seed only).

The first strategy is the reference: every other row of the same beta shows its mean FAA difference to it over
the same seeds with a 95 % confidence interval (paired t: a seed fixes the splits, initialisations and data
order, so each pair differs by the method only). A difference whose interval excludes 0 is resolved.

``--seeds N`` repeats every table run with N seeds (the run config's, then 1, 2, ...: other client splits, adapter
initialisations and data orders) and reports the mean, with the FAA's standard deviation: on a CPU, runs of the
same seed can also differ by a few points, because multithreaded kernels do not add in a fixed order and training
on a few dozen images per client amplifies the last bits. Gram settings (alpha-*, gram-*) are not varied for methods that
send no Grams (fedavg-lora, ffa-lora): they would not change the run. A strategy written ``NAME:KEY=VALUE ...`` is NAME with those settings added.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import matplotlib
import scipy.stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.methods import METHODS  # noqa: E402
from deploy.processes import ROOT, flwr_run, run_status  # noqa: E402
from deploy.simulate import simulation_superlink  # noqa: E402

COLUMNS = [
    "strategy", "beta", "chosen", "seeds", "faa", "faa_std", "faa_pooled", "task_aware_faa", "forgetting",
    "forgetting_after_learning", "final_acc_per_task", "wall_s", "uplink_kB", "downlink_kB", "merge_ms",
    "diff", "diff_low", "diff_high", "faa_seeds",
]
# LoRM and both cross-task rules of each averaging baseline (fed-mammoth's default is "mean").
DEFAULT_STRATEGIES = [
    "lorm", "fedavg-lora:cross-task='mean'", "fedavg-lora:cross-task='chain'", "ffa-lora:cross-task='mean'",
    "ffa-lora:cross-task='chain'", "regmean",
]
OWN_DELTA = " (each task on its own delta)"


def run_flower(config: str, name: str, out: Path, supernodes: int) -> None:
    with simulation_superlink(out / "link" / name) as env:
        run_id = flwr_run(env, "sim", ROOT, config, ["--federation-config", f"num-supernodes={supernodes}"])
        status = run_status(env, "sim", run_id)
    if not status.startswith("finished:completed"):
        raise SystemExit(f"{name}: run {run_id} ended {status}")


def run_in_process(config: str, name: str, supernodes: int) -> None:
    from flwr.common.config import parse_config_args

    from common.config import RunConfig
    from deploy.inprocess import InProcessTransport, run_in_process
    from server.server_app import execute

    run = RunConfig.parse(parse_config_args([config]), source="--run-config")
    execute(run, name, lambda schedule: run_in_process(schedule, InProcessTransport(run, supernodes)))


def parse_strategy(spec: str) -> tuple[str, str]:
    """"lorm:alpha-head=0 rank=8" -> ("lorm", "alpha-head=0 rank=8"); the name must be a known method."""
    name, _, extra = spec.partition(":")
    if name not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown strategy {name!r}; known: {sorted(METHODS)}")
    return name, extra.strip()


def parse_tune(spec: str) -> tuple[str, list[str]]:
    """"lr=1e-3,3e-3" -> ("lr", ["1e-3", "3e-3"])."""
    key, _, values = spec.partition("=")
    if not key or not values:
        raise argparse.ArgumentTypeError(f"--tune wants KEY=V1,V2,..., got {spec!r}")
    return key.strip(), [v.strip() for v in values.split(",") if v.strip()]


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text).strip("-")


class NotFinished(Exception):
    """A run that --finished-only does not start."""


def run_one(name: str, strategy: str, beta: float, overrides: str, out: Path, supernodes: int, in_process: bool,
            start: bool = True) -> dict:
    """``strategy``: a spec for parse_strategy; ``overrides``: run-config settings added for this run;
    ``start``: run it if it has not finished (else NotFinished)."""
    method, extra = parse_strategy(strategy)
    folder = out / "runs" / name
    if not (folder / "metrics.json").exists() or json.loads((folder / "metrics.json").read_text()).get("wall_s") is None:
        if not start:
            raise NotFinished(name)
        config = f"strategy='{method}' beta={beta} output-dir='{out / 'runs'}' run-name='{name}' {overrides} {extra}"
        if in_process:
            run_in_process(config, name, supernodes)
        else:
            run_flower(config, name, out, supernodes)
    metrics = json.loads((folder / "metrics.json").read_text())
    with open(folder / "rounds.csv") as f:
        rounds = list(csv.DictReader(f))

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in rounds) / len(rounds)

    return {
        "strategy": strategy, "beta": beta, "chosen": "", "faa": metrics["faa"], "faa_pooled": metrics["faa_pooled"],
        "task_aware_faa": metrics.get("task_aware_faa", float("nan")), "forgetting": metrics["average_forgetting"],
        "forgetting_after_learning": metrics["forgetting_after_learning"],
        "final_acc_per_task": metrics["acc_matrix"][-1], "wall_s": metrics["wall_s"],
        "uplink_kB": mean("uplink_bytes_per_client") / 1e3, "downlink_kB": mean("downlink_bytes_per_client") / 1e3,
        "merge_ms": 1e3 * mean("merge_s"), "faa_per_task": metrics["average_accuracy_after_task"], "folder": folder,
    }


def own_delta_row(row: dict) -> dict:
    """The diagnostic row of a finished run: every task evaluated on W0 + its own task delta (the final head),
    class-incremental over all classes seen and task-aware; what merging the deltas into one backbone costs."""
    from bench.ablate_task_merge import load_finished, own_delta

    _, state, exp = load_finished(row["folder"])
    acc, aware = own_delta(state, exp)
    nan = float("nan")
    return row | {
        "strategy": row["strategy"] + OWN_DELTA, "faa": sum(acc) / len(acc), "faa_pooled": nan,
        "task_aware_faa": sum(aware) / len(aware), "forgetting": nan, "forgetting_after_learning": nan,
        "final_acc_per_task": acc, "faa_per_task": [nan] * (len(acc) - 1) + [sum(acc) / len(acc)],
    }


def aggregate(rows: list[dict]) -> dict:
    """One table row from the runs of several seeds: means, and the FAA's sample standard deviation."""
    def mean(key: str):
        values = [r[key] for r in rows]
        if isinstance(values[0], list):
            return [sum(v) / len(v) for v in zip(*values)]
        return sum(values) / len(values)

    faas = [r["faa"] for r in rows]
    spread = statistics.stdev(faas) if len(faas) > 1 else 0.0
    keys = ("faa", "faa_pooled", "task_aware_faa", "forgetting", "forgetting_after_learning", "final_acc_per_task",
            "wall_s", "uplink_kB", "downlink_kB", "merge_ms", "faa_per_task")
    return rows[0] | {key: mean(key) for key in keys} | {"faa_std": spread, "seeds": len(rows), "faa_seeds": faas}


def paired_difference(faas: list[float], reference: list[float]) -> tuple[float, float, float]:
    """Mean FAA difference to the reference over the same seeds, with its 95 % confidence interval (paired t):
    (mean, low, high). Seeds fix the splits, initialisations and data order, so each pair differs by method only;
    with one seed the interval is unbounded."""
    diffs = [a - b for a, b in zip(faas, reference, strict=True)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, -math.inf, math.inf
    half = scipy.stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def add_paired_differences(rows: list[dict], reference: str) -> None:
    """Each row's paired difference to the ``reference`` strategy's row of the same beta (the seeds pair up)."""
    for row in rows:
        ref = next((r for r in rows if r["strategy"] == reference and r["beta"] == row["beta"]), None)
        if ref is None or row is ref or len(ref["faa_seeds"]) != len(row["faa_seeds"]):
            row["diff"] = None
            continue
        row["diff"] = paired_difference(row["faa_seeds"], ref["faa_seeds"])


def write_table(rows: list[dict], out: Path) -> None:
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            diff = row.get("diff") or (math.nan,) * 3
            writer.writerow(row | {"final_acc_per_task": " ".join(f"{a:.1f}" for a in row["final_acc_per_task"]),
                                   "diff": diff[0], "diff_low": diff[1], "diff_high": diff[2],
                                   "faa_seeds": " ".join(f"{a:.2f}" for a in row["faa_seeds"])})
    lines = [
        "| strategy | beta | chosen on validation | FAA % (mean ± std over seeds) | FAA − reference, paired, 95 % CI "
        "| FAA pooled % | task-aware FAA % "
        "| forgetting (best earlier) | forgetting (after learning) | final acc per task % "
        "| wall s | uplink kB/client/round | downlink kB/client/round | merge ms/round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = r.get("diff")
        paired = "-" if diff is None else f"{diff[0]:+.2f} [{diff[1]:+.2f}, {diff[2]:+.2f}]"
        lines.append(
            f"| {r['strategy']} | {r['beta']} | {r['chosen'] or '-'} | {r['faa']:.2f} ± {r['faa_std']:.2f} "
            f"({r['seeds']}) | {paired} | {r['faa_pooled']:.2f} | {r['task_aware_faa']:.2f} | "
            f"{r['forgetting']:.2f} | {r['forgetting_after_learning']:.2f} | "
            f"{' '.join(f'{a:.1f}' for a in r['final_acc_per_task'])} | {r['wall_s']:.0f} | {r['uplink_kB']:.1f} | "
            f"{r['downlink_kB']:.1f} | {r['merge_ms']:.1f} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], out: Path) -> None:
    betas = sorted({r["beta"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(betas), figsize=(5 * len(betas), 4), squeeze=False)
    for ax, beta in zip(axes[0], betas):
        for r in (r for r in rows if r["beta"] == beta):
            ax.plot(range(1, len(r["faa_per_task"]) + 1), r["faa_per_task"], marker="o", label=r["strategy"])
        ax.set(title=f"beta = {beta}", xlabel="tasks seen", ylabel="average accuracy on seen tasks (%)",
               xticks=range(1, max(len(r["faa_per_task"]) for r in rows) + 1))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "faa.png", dpi=120)


def grid(strategy: str, tunes: list[tuple[str, list[str]]]) -> list[str]:
    """Every combination of the tuned settings that can change ``strategy``'s run, as run-config strings."""
    method = METHODS[parse_strategy(strategy)[0]]
    axes = [[f"{key}={v}" for v in values] for key, values in tunes
            if method.round_grams or not key.startswith(("alpha-", "gram-"))]
    return [" ".join(combo) for combo in itertools.product(*axes)]


def tune(strategy: str, beta: float, tunes: list[tuple[str, list[str]]], args: argparse.Namespace
         ) -> tuple[str, list[dict]]:
    """(best settings by validation FAA, the validation rows) for one strategy and beta."""
    rows: list[dict] = []
    combos = grid(strategy, tunes)
    if combos == [""]:  # nothing tuned changes this strategy
        return "", rows
    for combo in combos:
        name = f"{slug(strategy)}-beta{beta}-val-{slug(combo)}"
        overrides = f"{args.run_config} validation-fraction={args.validation_fraction} {combo}"
        try:
            row = run_one(name, strategy, beta, overrides, args.out, args.supernodes, args.in_process)
        except (RuntimeError, SystemExit) as err:  # e.g. training diverged and every reply was dropped
            print(f"  validation {strategy} beta {beta} {combo}: failed ({err})", flush=True)
            row = {"strategy": strategy, "beta": beta, "faa": float("nan"), "forgetting": float("nan")}
        rows.append(row | {"chosen": combo})
        print(f"  validation {strategy} beta {beta} {combo}: FAA {row['faa']:.2f}%", flush=True)
    ranked = [i for i in range(len(combos)) if not math.isnan(rows[i]["faa"])]
    if not ranked:
        raise SystemExit(f"{strategy} beta {beta}: every validation run failed")
    best = max(ranked, key=lambda i: (rows[i]["faa"], -i))
    return combos[best], rows


def write_tuning(rows: list[dict], out: Path) -> None:
    lines = ["| strategy | beta | setting | validation FAA % | validation forgetting |", "|---|---|---|---|---|"]
    lines += [f"| {r['strategy']} | {r['beta']} | {r['chosen']} | {r['faa']:.2f} | {r['forgetting']:.2f} |" for r in rows]
    (out / "tuning.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES,
                        help=f"from {sorted(METHODS)}, each optionally NAME:KEY=VALUE ... (a variant row)")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.5, 0.1])
    parser.add_argument("--run-config", default="", help="overrides for every run, e.g. \"num-tasks=2\"")
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "compare")
    parser.add_argument("--in-process", action="store_true", help="no Flower runtime: see the module docstring")
    parser.add_argument("--tune", type=parse_tune, action="append", default=[], metavar="KEY=V1,V2,...",
                        help="choose KEY per strategy and beta on a validation hold-out (see above)")
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, default=1, help="table runs per row (see above)")
    parser.add_argument("--finished-only", action="store_true",
                        help="start no run: the table of the rows whose every run has finished")
    parser.add_argument("--own-delta", default="lorm", metavar="METHOD",
                        help="add a diagnostic row for this method's runs: each task on W0 + its own delta")
    args = parser.parse_args(argv)
    for spec in args.strategies:
        try:
            parse_strategy(spec)
        except argparse.ArgumentTypeError as e:
            parser.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    rows, tuning = [], []
    for beta in args.betas:
        for strategy in args.strategies:
            started = time.perf_counter()
            overrides, chosen = args.run_config, ""
            if args.tune:
                chosen, val_rows = tune(strategy, beta, args.tune, args)
                tuning += val_rows
                write_tuning(tuning, args.out)
                overrides = f"{overrides} {chosen}"
            try:
                runs = [
                    run_one(f"{slug(strategy)}-beta{beta}" + (f"-seed{k}" if k else ""), strategy, beta,
                            overrides + (f" seed={k}" if k else ""), args.out, args.supernodes, args.in_process,
                            start=not args.finished_only)
                    for k in range(args.seeds)
                ]
            except NotFinished as missing:
                print(f"{strategy} beta {beta}: left out, run {missing} has not finished", flush=True)
                continue
            rows.append(aggregate(runs) | {"chosen": chosen})
            print(f"{strategy} beta {beta}: FAA {rows[-1]['faa']:.2f} +- {rows[-1]['faa_std']:.2f}% "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            trained = json.loads((runs[0]["folder"] / "config.json").read_text())["head"] == "trained"
            if parse_strategy(strategy)[0] == args.own_delta and trained:  # an analytic run has no task deltas
                rows.append(aggregate([own_delta_row(r) for r in runs]) | {"chosen": chosen})
            add_paired_differences(rows, args.strategies[0])
            write_table(rows, args.out)
    plot(rows, args.out)
    print((args.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
