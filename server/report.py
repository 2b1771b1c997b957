"""Results a person can read: the run folder's JSON, CSV and PNG files.

    <output-dir>/<run-name>/
        config.json       the validated run config (written at the run's first checkpoint: a run refused at
                          start-up, or resumed with nothing left to do, leaves the folder as it was)
        rounds.csv        one line per round: task, round, factor, clients, drops, the partitions merged, loss,
                          bytes, merge and wall time (head = "analytic": one line per task, factor "head-sums")
        acc_matrix.csv    acc[t][j] (%) after task t on task j's classes (empty when j > t)
        metrics.json      FAA, average forgetting, accuracy per task after each task, the matrix, wall time, and
                          the task-aware FAA and matrix (argmax within each task's classes: a diagnostic);
                          wall_s adds up the schedule's time over every session of a resumed run
        acc_matrix.png    heatmap of the matrix
        faa.png           average accuracy over the tasks seen, after each task
        state.pt          the server checkpoint (see server/state.py)
        model/            the merged model after the last finished task, for timm and peft, with its card
                          (common/export.py, server/export.py)
        .lock             held by the ServerApp running the folder's run (RunReport.locked)
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from logging import WARNING
from pathlib import Path
from typing import Any

import matplotlib
from flwr.common.logger import log

matplotlib.use("Agg")  # headless servers have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.metrics import (  # noqa: E402
    average_accuracy, average_forgetting, forgetting_after_learning, pooled_accuracy, square_matrix,
)
from server.state import replaced_atomically  # noqa: E402

ROUND_FIELDS = [
    "task", "round", "factor", "clients", "dropped", "partitions", "train_loss", "uplink_bytes_per_client",
    "downlink_bytes_per_client", "merge_s", "wall_s",
]


# Two conventions for each headline number, named so that neither is mistaken for the other.
CONVENTIONS = {
    "faa": "mean over tasks of the final accuracy on each task's test classes",
    "faa_pooled": "final accuracy over all test samples of the tasks seen, pooled (the reference code's FAA)",
    "average_forgetting": "mean over earlier tasks of (best accuracy before the last task - final accuracy)",
    "forgetting_after_learning": "mean over earlier tasks of (accuracy just after learning it - final accuracy), "
    "the reference code's forgetting",
}


def summary(
    acc: list[list[float]], test_samples: list[int], task_aware: list[list[float]] | None = None
) -> dict[str, Any]:
    """metrics.json's content. test_samples[j]: task j's test images (for the pooled accuracy)."""
    matrix = square_matrix(acc)
    result = {
        "faa": average_accuracy(matrix),
        "faa_pooled": pooled_accuracy(matrix, test_samples),
        "average_forgetting": average_forgetting(matrix),
        "forgetting_after_learning": forgetting_after_learning(matrix),
        "conventions": CONVENTIONS,
        "average_accuracy_after_task": [average_accuracy(matrix, t) for t in range(len(acc))],
        "final_accuracy_per_task": list(matrix[-1]),
        "acc_matrix": acc,
    }
    if task_aware and len(task_aware) == len(acc):
        result |= {"task_aware_faa": average_accuracy(square_matrix(task_aware)),
                   "task_aware_acc_matrix": task_aware}
    return result


# How long a run waits for its folder's lock: long enough for the ServerApp of an earlier submission to finish
# stopping (Flower's SuperExec ends it, or its own retries give up, once its SuperLink died or restarted).
LOCK_WAIT_S = 60.0


class RunLocked(RuntimeError):
    """Another process holds the run folder: two ServerApps with one run-name would both write its checkpoint."""


class RunReport:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock (an flock on <folder>/.lock, freed by the kernel when the process dies) for the
        whole run. When another process has it, wait up to LOCK_WAIT_S (the ServerApp of a submission whose
        SuperLink restarted may still be stopping), then RunLocked naming the holder's pid."""
        with open(self.folder / ".lock", "a+") as f:
            deadline, warned = time.monotonic() + LOCK_WAIT_S, False
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    f.seek(0)
                    holder = f.read().strip() or "?"
                if time.monotonic() > deadline:
                    raise RunLocked(
                        f"run folder {self.folder} is in use by another run (pid {holder}); wait for it to end or "
                        "choose another run-name"
                    )
                if not warned:
                    log(WARNING, "run folder %s is in use by pid %s; waiting up to %.0f s for it to end", self.folder,
                        holder, LOCK_WAIT_S)
                    warned = True
                time.sleep(0.5)
            f.truncate(0)
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def read_results(self) -> dict[str, Any]:
        return json.loads((self.folder / "metrics.json").read_text())

    def write_config(self, config: dict[str, Any]) -> None:
        with replaced_atomically(self.folder / "config.json") as f:  # a crash mid-write keeps the old one
            f.write(json.dumps(config, indent=2, sort_keys=True).encode())

    def write_rounds(self, history: list[dict[str, Any]]) -> None:
        # Rewritten whole from the checkpointed history, so a resumed run has no duplicate or missing lines.
        with open(self.folder / "rounds.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=ROUND_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)

    def write_results(
        self, acc: list[list[float]], test_samples: list[int], extra: dict[str, Any],
        task_aware: list[list[float]] | None = None,
    ) -> dict[str, Any]:
        result = summary(acc, test_samples, task_aware) | extra
        with replaced_atomically(self.folder / "metrics.json") as f:
            f.write(json.dumps(result, indent=2).encode())
        matrix = square_matrix(acc)
        with open(self.folder / "acc_matrix.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["after_task"] + [f"task_{j}" for j in range(len(acc))])
            for t, row in enumerate(matrix):
                writer.writerow([t] + ["" if np.isnan(v) else f"{v:.2f}" for v in row])
        self._plot_matrix(matrix)
        self._plot_faa(result["average_accuracy_after_task"])
        return result

    def _plot_matrix(self, matrix: np.ndarray) -> None:
        n = matrix.shape[0]
        fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.6 * n))
        im = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=100, cmap="viridis")
        for t in range(n):
            for j in range(t + 1):
                ax.text(j, t, f"{matrix[t, j]:.0f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xlabel("evaluated on task j")
        ax.set_ylabel("after training task t")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_title("accuracy matrix (%)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(self.folder / "acc_matrix.png", dpi=120)
        plt.close(fig)

    def _plot_faa(self, average: list[float]) -> None:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(range(1, len(average) + 1), average, marker="o")
        ax.set_xlabel("tasks seen")
        ax.set_ylabel("average accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_xticks(range(1, len(average) + 1))
        ax.grid(alpha=0.3)
        ax.set_title(f"FAA {average[-1]:.2f}%")
        fig.tight_layout()
        fig.savefig(self.folder / "faa.png", dpi=120)
        plt.close(fig)
