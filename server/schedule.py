"""The class-incremental schedule: tasks, rounds, a checkpoint after each step, evaluation at each task end.

    for each task t:      fresh adapter (B = 0, A from a seed every client shares), the task's head block
        for each round:   clients train the round's factors + head block -> the method's merge
        task end:         (if the method asks) clients' Grams -> the method's task-end rule
                          evaluate W0 + the method's delta on every task seen -> one row of the accuracy matrix
                          export that model for timm and peft (server/export.py)

With head = "analytic" the evaluated model is W0 with a ridge head over every class seen, so no adapter trains:
each task is one exchange, the clients' head sums through W0, then the same evaluation and export.

The method (common/methods/) says what each step computes and the aggregation (server/aggregation.py) how the
replies are gathered; this module names neither a method nor a privacy mode. Only replies that pass validation
enter a merge, so a client that fails or times out is left out of that round (and logged) while at least
``min-clients`` replied.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from logging import INFO

import torch
from flwr.common.logger import log
from torch import Tensor

from common.analytic import HeadSums, head_rows
from common.experiment import Experiment, stable_seed
from common.identity import PartitionBook
from common.layout import CLASS_SUMS, GRAMS, HEAD_SUMS, TRAIN
from common.lora import init_adapter
from common.merges import MergeError, TaskSums
from common.methods import CrossTask
from common.methods.base import COUNT_N
from common.model import HEAD
from common.protocol import RoundOrder
from server.aggregation import Aggregation
from server.evaluation import evaluate_seen
from server.export import export_model
from server.report import RunReport
from server.state import ServerState
from server.transport import RoundFailed

HEAD_SUMS_FACTOR = "head-sums"  # rounds.csv's factor column for a task's head-sums exchange (head = "analytic")


class Schedule:
    def __init__(self, exp: Experiment, report: RunReport, fingerprint: str, merge_device: str) -> None:
        self.exp, self.config, self.method = exp, exp.run, exp.run.method
        self.report = report
        self.fingerprint = fingerprint
        self.merge_device = merge_device
        self.checkpoint = report.folder / "state.pt"
        self.state = self._initial_state()
        # Called at each task end with (task, the backbone delta evaluated): benches that study the merged model.
        self.task_end_observers: list[Callable[[int, dict[str, Tensor]], None]] = []
        # Who holds which partition; the run's num-partitions as set, or as learnt before a restart.
        self.partitions = PartitionBook(
            exp.stream, self.config.beta, self.config.seed, self.config.num_partitions or self.state.num_partitions
        )
        # This session's clock, from the time earlier sessions had run; config.json waits for the first checkpoint.
        self._clock, self._wall_before, self._config_written = time.perf_counter(), self.state.wall_s, False

    def _fresh_adapter(self, *seed: int) -> tuple[dict, dict]:
        return init_adapter(self.exp.shapes, self.config.rank, seed=stable_seed(self.config.seed, *seed))

    def _initial_state(self) -> ServerState:
        if self.checkpoint.exists():
            state = ServerState.load(self.checkpoint, self.fingerprint, self.config.num_partitions)
            log(INFO, "resuming from %s at task %d round %d", self.checkpoint, state.task, state.round)
            return state
        A, B = self._fresh_adapter(0)
        # Drawn again as the model was built: in one process another run may have trained the live head.
        weight, bias = self.exp.model.initial_head()
        head = self.exp.model.head
        head_sums = HeadSums.zeros(head.in_features, head.out_features) if self.config.head == "analytic" else None
        return ServerState(
            task=0, round=0, A=A, B=B, sums=TaskSums(), head_weight=weight, head_bias=bias, head_sums=head_sums
        )

    @property
    def finished(self) -> bool:
        return self.state.task >= len(self.exp.tasks)

    def _save(self) -> None:
        if not self._config_written:  # only a run that did work writes it, so a refused one never overwrites it
            self.report.write_config(self.config.model_dump(by_alias=True))
            self._config_written = True
        self.state.wall_s = self._wall_before + time.perf_counter() - self._clock
        self.state.num_partitions = self.partitions.num_partitions
        self.state.save(self.checkpoint, self.fingerprint)
        self.report.write_rounds(self.state.history)

    def summary(self) -> str:
        r = self.config
        if r.head == "analytic":
            return (
                f"analytic head on W0 (ridge {r.head_ridge:g}): {len(self.exp.tasks)} tasks, one head-sums exchange "
                f"each; no adapter trains, so strategy {r.strategy!r} and its round settings do not enter the model"
            )
        return (
            f"{r.strategy}: {len(self.exp.tasks)} tasks x {r.rounds_per_task} rounds "
            f"({' '.join(self.method.schedule(r.rounds_per_task))}), rank {r.rank}, alpha backbone "
            f"{r.alpha_backbone:.2f} / head {r.alpha_head:.2f}, {len(self.exp.shapes)} adapted layers, trained head"
        )

    def _order(self, factor: str) -> RoundOrder:
        s = self.state
        lo, hi = self.exp.block(s.task)
        return RoundOrder(
            task=s.task, round=s.round, factor=factor, block=(lo, hi), A=s.A, B=s.B, past=s.past,
            head_weight=s.head_weight[lo:hi] if factor else None, head_bias=s.head_bias[lo:hi] if factor else None,
            past_mode=self.method.past_mode,
        )

    def _exchange(self, aggregation: Aggregation, kind: str, factor: str):
        lo, hi = self.exp.block(self.state.task)
        spec = self.method.reply_spec(kind, factor, self.exp.dims, hi - lo)
        order = self._order(factor)
        if kind == HEAD_SUMS:  # features through W0 alone: the order carries no adapter
            order = dataclasses.replace(order, A={}, B={}, past=[])
        return aggregation.exchange(order, spec, self.method)

    def _on_device(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        return {key: t.to(self.merge_device) for key, t in terms.items()}

    def run(self, aggregation: Aggregation) -> ServerState:
        """Every remaining round and task end, checkpointed after each; returns the final state."""
        log(INFO, "%s", self.summary())
        s, tasks = self.state, self.exp.tasks
        rounds = self.config.rounds_per_task if s.head_sums is None else 0  # an analytic head needs no adapter
        factors = self.method.schedule(rounds)
        while s.task < len(tasks):
            while s.round < rounds:
                started = time.perf_counter()
                record = {"task": s.task, "round": s.round, "factor": factors[s.round]}
                record |= self._round(aggregation, factors[s.round])
                record["wall_s"] = time.perf_counter() - started
                s.history.append(record)
                s.round += 1
                self._save()
                log(
                    INFO,
                    "[task %d/%d round %d/%d %s] %d clients, loss %.4f, merge %.3f s, up %.1f kB/client, %.1f s",
                    s.task + 1, len(tasks), s.round, rounds, record["factor"], record["clients"],
                    record["train_loss"], record["merge_s"], record["uplink_bytes_per_client"] / 1e3,
                    record["wall_s"],
                )
            self._task_end(aggregation)
        return s

    def _round(self, aggregation: Aggregation, factor: str) -> dict:
        """One round's exchange and merge; returns the round's record fields."""
        s = self.state
        gathered = self._exchange(aggregation, TRAIN, factor)
        started = time.perf_counter()
        try:
            update = self.method.merge_round(factor, self._on_device(gathered.terms), (s.A, s.B), self.config.ridge)
            factors = {f: stored(t) for f, t in update.factors.items()}
            head = stored({"head weight": update.head_weight, "head bias": update.head_bias})
            finished = tuple(stored(f) for f in update.finished) if update.finished else None
        except MergeError as err:
            raise RoundFailed(f"task {s.task} round {s.round}: {err}") from None
        s.A, s.B = factors.get("A", s.A), factors.get("B", s.B)
        lo, hi = self.exp.block(s.task)
        s.head_weight[lo:hi], s.head_bias[lo:hi] = head["head weight"], head["head bias"]
        if finished:  # the round's merged delta joins the past; the next round starts a fresh adapter
            s.past.append(finished)
            s.A, s.B = self._fresh_adapter(s.task, s.round + 1)
        return gathered.record | {"merge_s": time.perf_counter() - started}

    def _task_end(self, aggregation: Aggregation) -> None:
        s = self.state
        if s.head_sums is None:
            deltas = self._merged_delta(aggregation)
            head_weight, head_bias = s.head_weight, s.head_bias
        else:
            deltas, head_weight, head_bias = self._analytic_head(aggregation)
        for observe in self.task_end_observers:
            observe(s.task, deltas)
        row, aware = evaluate_seen(self.exp, deltas, head_weight, head_bias, upto_task=s.task)
        s.acc.append(row)
        s.task_aware.append(aware)
        result = self.report.write_results(s.acc, self.exp.test_samples, {"tasks_done": s.task + 1}, s.task_aware)
        log(
            INFO,
            "[task %d/%d done] accuracy per task %s -> average %.2f%% (task-aware %.2f%%)",
            s.task + 1, len(self.exp.tasks), " ".join(f"{a:.1f}" for a in row), result["faa"],
            result.get("task_aware_faa", math.nan),
        )
        # The model just evaluated, as files timm and peft load (<run>/model/); redone if the run resumes here.
        exported = export_model(self.exp, self.report.folder, deltas, head_weight, head_bias, s.task, result)
        log(INFO, "model exported to %s (LoRA rank %d, %.1f s)", self.report.folder / "model",
            exported["adapter_rank"], exported["export_s"])
        s.task += 1
        s.round = 0
        if s.task < len(self.exp.tasks):
            s.A, s.B = self._fresh_adapter(s.task)
        self._save()

    def _merged_delta(self, aggregation: Aggregation) -> dict[str, Tensor]:
        """The method's task-end rule (with the clients' Grams if it asks for them); returns the delta to evaluate."""
        s, method = self.state, self.method
        grams = None
        if method.task_end_grams:
            gathered = self._exchange(aggregation, GRAMS, "")  # the running sums stay on the CPU, as checkpointed
            grams = {key[len("gram/"):]: t for key, t in gathered.terms.items() if key.startswith("gram/")}
            log(INFO, "[task %d/%d end] Grams of %d clients (partitions %s), %d dropped", s.task + 1,
                len(self.exp.tasks), gathered.clients, " ".join(map(str, gathered.partitions)) or "withheld",
                gathered.dropped)
        cross = method.end_task((s.A, s.B), CrossTask(s.past, s.sums), grams)
        s.past, s.sums = cross.past, cross.sums
        return method.eval_deltas(cross, list(self.exp.shapes), self.config.ridge)

    def _analytic_head(self, aggregation: Aggregation) -> tuple[dict, Tensor, Tensor]:
        """head = "analytic": the task's head sums join the running ones (the exchange is the task's one line in
        rounds.csv); returns the model to evaluate, W0 (a zero delta: the sums were taken through W0) with the
        ridge head over every class seen (bias 0)."""
        s = self.state
        lo, hi = self.exp.block(s.task)
        started = time.perf_counter()
        gathered = self._exchange(aggregation, HEAD_SUMS, "")
        solving = time.perf_counter()
        terms = gathered.terms
        s.head_sums.add(terms[f"gram/{HEAD}"], terms[CLASS_SUMS].T, round(float(terms[COUNT_N].item())), lo)
        weight, bias = head_rows(s.head_sums, self.config.head_ridge, hi)
        done = time.perf_counter()
        s.history.append({"task": s.task, "round": 0, "factor": HEAD_SUMS_FACTOR} | gathered.record
                         | {"merge_s": done - solving, "wall_s": done - started})
        log(INFO, "[task %d/%d end] head sums of %d clients (partitions %s), %d dropped, up %.1f kB/client",
            s.task + 1, len(self.exp.tasks), gathered.clients, " ".join(map(str, gathered.partitions)) or "withheld",
            gathered.dropped, gathered.uplink_bytes_per_client / 1e3)
        zero = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in self.exp.shapes.items()}
        return zero, weight, bias


def stored(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A merge's result as the state keeps it (float32, CPU); a non-finite one is refused, never stored."""
    out = {name: t.to(torch.float32).cpu() for name, t in tensors.items()}
    for name, t in out.items():
        if not torch.isfinite(t).all():
            raise MergeError(f"merged {name} is not finite in float32; the state stays at the last round")
    return out
