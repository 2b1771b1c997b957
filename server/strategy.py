"""The LoRM strategy: task schedule, B/A alternation, closed-form merges, cross-task fold and evaluation.

A Flower ``Strategy`` whose ``start`` runs the class-incremental schedule instead of a flat list of rounds:

    for each task t:      fresh adapter (B = 0, A from a seed every client shares), the task's head block
        for each round:   clients train the round's factor (B, A, B, ...) + head block -> closed-form merge
        task end:         clients send Grams through W0 + mean of task deltas -> S += (BA)G, H += G
                          evaluate W0 + S pinv(H) on every task seen -> one row of the accuracy matrix

Only replies that pass validation enter a merge; the closed forms need nothing else, so a client that fails or
times out is simply left out of that round (and logged) while at least ``min-clients`` replied.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.experiment import HEAD, Experiment, stable_seed
from common.lora import init_adapter
from common.merges import MergeError, TaskSums, delta_sum, merge_head, merge_round, regmean_lowrank, weighted_average
from common.lorm_manifest_pb2 import GRAMS_REPLY, ROUND_REPLY
from common.protocol import GRAMS, TRAIN, ClientReply, ProtocolError, RoundOrder
from common.validation import InvalidUpdate, validate_update
from common.wire import nbytes
from server.evaluation import evaluate_seen
from server.report import RunReport
from server.state import ServerState
from server.transport import Envelope, FlowerTransport, RoundFailed, Transport, too_large


class LoRMStrategy(Strategy):
    def __init__(self, exp: Experiment, report: RunReport, fingerprint: str, merge_device: str) -> None:
        self.exp = exp
        self.run = exp.run
        self.method = exp.run.method
        self.report = report
        self.fingerprint = fingerprint
        self.merge_device = merge_device
        self.checkpoint = report.folder / "state.pt"
        self.state = self._initial_state()

    # -- state -------------------------------------------------------------------------------------------------
    def _fresh_adapter(self, task: int) -> tuple[dict, dict]:
        return init_adapter(self.exp.shapes, self.run.rank, seed=stable_seed(self.run.seed, task))

    def _initial_state(self) -> ServerState:
        if self.checkpoint.exists():
            state = ServerState.load(self.checkpoint, self.fingerprint)
            log(INFO, "resuming from %s at task %d round %d", self.checkpoint, state.task, state.round)
            return state
        A, B = self._fresh_adapter(0)
        head = self.exp.model.head
        return ServerState(
            task=0,
            round=0,
            A=A,
            B=B,
            head_weight=torch.zeros_like(head.weight, device="cpu"),
            head_bias=torch.zeros_like(head.bias, device="cpu"),
            sums=TaskSums(),
        )

    def _save(self) -> None:
        self.state.save(self.checkpoint, self.fingerprint)
        self.report.write_rounds(self.state.history)

    # -- Flower Strategy interface -------------------------------------------------------------------------------
    def summary(self) -> None:
        r = self.run
        log(
            INFO,
            "LoRM: %d tasks x %d rounds (%s), rank %d, alpha backbone %.2f / head %.2f, %d adapted layers",
            len(self.exp.tasks), r.rounds_per_task, "".join(r.factor_schedule), r.rank, r.alpha_backbone,
            r.alpha_head, len(self.exp.shapes),
        )

    def _order(self, factor: str) -> RoundOrder:
        s = self.state
        lo, hi = self.exp.block(s.task)
        with_head = factor != ""
        return RoundOrder(
            task=s.task,
            round=s.round,
            factor=factor,
            block=(lo, hi),
            A=s.A,
            B=s.B,
            past=s.past,
            head_weight=s.head_weight[lo:hi] if with_head else None,
            head_bias=s.head_bias[lo:hi] if with_head else None,
            past_mode=self.method.past_mode,
        )

    # The schedule (``run_schedule``) drives the rounds itself; these hooks of Flower's flat-round loop are unused.
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list:
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[None, None]:
        return None, None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list:
        return []  # evaluation is central, on the server (see _task_end)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> None:
        return None

    # -- validation and merges -----------------------------------------------------------------------------------
    def _expected(self, factor: str) -> tuple[dict[str, tuple], dict[str, tuple]]:
        """Shapes a valid reply must have: trained factor (+ head block) and Grams per layer."""
        r = self.run.rank
        factors: dict[str, tuple] = {
            f"{f}:{name}": ((d_out, r) if f == "B" else (r, d_in))
            for f in factor
            for name, (d_out, d_in) in self.exp.shapes.items()
        }
        if factor:
            lo, hi = self.exp.block(self.state.task)
            d = self.exp.model.head.in_features
            factors |= {"head.weight": (hi - lo, d), "head.bias": (hi - lo,)}
        if factor and not self.method.round_grams:
            return factors, {}
        layers = {name: d for name, d in self.exp.gram_d_in.items() if factor or name != HEAD}
        grams = {name: ((d, d) if self.exp.gram_dense[name] else (d,)) for name, d in layers.items()}
        if self._projected(factor):  # B-rounds carry A G A^T (see client/local.py)
            grams |= {name: (r, r) for name in self.exp.shapes}
        return factors, grams

    def _projected(self, factor: str) -> bool:
        return factor == "B" and self.method.round_grams

    def _max_reply_bytes(self, factor: str) -> int:
        """A valid reply's arrays at float64, plus room for the keys: anything larger is not a valid reply."""
        factors, grams = self._expected(factor)
        numbers = sum(math.prod(s) for s in factors.values())
        numbers += sum(d * (d + 1) // 2 if len(s) == 2 else d for s in grams.values() for d in s[:1])
        return 8 * numbers + 256 * (len(factors) + len(grams)) + 4096

    def select(self, envelopes: Iterable[Envelope], expect_factor: str) -> tuple[list[ClientReply], int]:
        """The replies fit to merge, and how many were dropped (each with a log line naming node and reason).

        envelopes: (node id, (arrays, config)) as the client sent them, or (node id, reason) when unusable.
        """
        expected_factors, expected_grams = self._expected(expect_factor)
        limit = self._max_reply_bytes(expect_factor)
        valid, dropped = [], []
        for node, content in envelopes:
            if isinstance(content, str):
                dropped.append((node, content))
                continue
            try:
                reply = self._accept(node, *content, expect_factor, expected_factors, expected_grams, limit)
            except (InvalidUpdate, ProtocolError, KeyError, ValueError, TypeError, RuntimeError) as err:
                dropped.append((node, f"{type(err).__name__}: {err}"))
                continue
            valid.append(reply)
        for node, reason in dropped:
            log(WARNING, "dropping node %s from task %d round %d: %s", node, self.state.task, self.state.round, reason)
        if len(valid) < self.run.min_clients:
            raise RoundFailed(
                f"task {self.state.task} round {self.state.round}: {len(valid)} valid replies, "
                f"min-clients is {self.run.min_clients}"
            )
        return valid, len(dropped)

    def _accept(
        self, node: int, arrays: dict, config: dict, expect_factor: str, expected_factors: dict, expected_grams: dict,
        limit: int,
    ) -> ClientReply:
        if (size := nbytes(arrays)) > limit:
            raise ProtocolError(too_large(size, limit))
        reply = ClientReply.from_wire(arrays, config, ROUND_REPLY if expect_factor else GRAMS_REPLY)
        if (reply.task, reply.round, reply.factor) != (self.state.task, self.state.round, expect_factor):
            raise ProtocolError(f"reply for task {reply.task} round {reply.round} factor {reply.factor!r} is stale")
        if reply.projected != (frozenset(self.exp.shapes) if self._projected(expect_factor) else frozenset()):
            raise ProtocolError("B-round replies (and only they) carry projected Grams A G A^T")
        tensors = {f"{f}:{name}": t for f, layers in reply.trained.items() for name, t in layers.items()}
        if expect_factor:
            tensors |= {"head.weight": reply.head_weight, "head.bias": reply.head_bias}
        validate_update(
            str(node), tensors, reply.grams, reply.num_examples, expected_factors, expected_grams,
            reply.gram_wire_dtype,
        )
        return reply

    def _merge_round(self, replies: list[ClientReply]) -> None:
        """The method's server merge of one round (see common/methods.py), into the state's adapter and head."""
        s, dev, ridge = self.state, self.merge_device, self.run.ridge
        factor = self.run.factor_schedule[s.round]
        counts = torch.tensor([r.num_examples for r in replies], device=dev)
        trained = {f: [r.trained[f] for r in replies] for f in factor}
        backbone_grams = [{k: g for k, g in r.grams.items() if k != HEAD} for r in replies]
        SERVER_MERGES[self.method.name](self, factor, trained, backbone_grams, counts)
        weights = torch.stack([r.head_weight for r in replies]).to(dev)
        biases = torch.stack([r.head_bias for r in replies]).to(dev)
        if self.method.round_grams:
            W, b = merge_head(weights, biases, torch.stack([r.grams[HEAD] for r in replies]).to(dev), counts, ridge)
        else:
            avg = weighted_average([{"w": w, "b": b} for w, b in zip(weights, biases)], counts)
            W, b = avg["w"], avg["b"]
        head = _cpu32({"head weight": W, "head bias": b})
        lo, hi = self.exp.block(s.task)
        s.head_weight[lo:hi] = head["head weight"]
        s.head_bias[lo:hi] = head["head bias"]

    def _fold_task(self, replies: list[ClientReply]) -> None:
        """S += (B A) G_total, H += G_total: the fold is linear in G, so the clients' Grams are summed first."""
        total = {name: sum(r.grams[name] for r in replies) for name in self.exp.shapes}
        self.state.sums.fold(self.state.A, self.state.B, total)

    # -- the schedule --------------------------------------------------------------------------------------------
    def _exchange(self, transport: Transport, kind: str, factor: str) -> tuple[list[Envelope], int]:
        arrays, config = self._order(factor).to_wire()
        limit = self._max_reply_bytes(factor)
        return transport.exchange(kind, arrays, config, limit), nbytes(arrays)

    def start(self, grid: Grid, *args, **kwargs) -> ServerState:  # type: ignore[override]
        """Run (or resume) the whole schedule over Flower; returns the final state."""
        return self.run_schedule(FlowerTransport(grid, self.run.min_clients, self.run.round_timeout))

    # One round, and a task end's statistics: server/secagg.py overrides both to merge from secure sums instead.
    def _round(self, transport: Transport, factor: str) -> dict:
        """One round's exchange and merge; returns the round's record fields."""
        envelopes, down = self._exchange(transport, TRAIN, factor)
        up = _mean_upload(envelopes)
        valid, dropped = self.select(envelopes, expect_factor=factor)
        merge_started = time.perf_counter()
        try:
            self._merge_round(valid)
        except MergeError as err:
            raise RoundFailed(f"task {self.state.task} round {self.state.round}: {err}") from None
        n = sum(r.num_examples for r in valid)
        return {
            "clients": len(valid), "dropped": dropped,
            "train_loss": sum(r.train_loss * r.num_examples for r in valid) / max(n, 1),
            "uplink_bytes_per_client": up, "downlink_bytes_per_client": down,
            "merge_s": time.perf_counter() - merge_started,
        }

    def _task_end_statistics(self, transport: Transport) -> None:
        """The task-end Grams into the cross-task sums S and H."""
        envelopes, _ = self._exchange(transport, GRAMS, "")
        self._fold_task(self.select(envelopes, expect_factor="")[0])

    def run_schedule(self, transport: Transport) -> ServerState:
        """Every remaining round and task end, checkpointed after each; returns the final state."""
        self.summary()
        s, tasks, rounds = self.state, self.exp.tasks, self.run.rounds_per_task
        while s.task < len(tasks):
            while s.round < rounds:
                started = time.perf_counter()
                factor = self.run.factor_schedule[s.round]
                record = {"task": s.task, "round": s.round, "factor": factor, **self._round(transport, factor)}
                record["wall_s"] = time.perf_counter() - started
                s.history.append(record)
                s.round += 1
                self._save()
                log(
                    INFO,
                    "[task %d/%d round %d/%d %s] %d clients, loss %.4f, merge %.3f s, up %.1f kB/client, %.1f s",
                    s.task + 1, len(tasks), s.round, rounds, factor, record["clients"], record["train_loss"],
                    record["merge_s"], record["uplink_bytes_per_client"] / 1e3, record["wall_s"],
                )
            self._task_end(transport)
        return s

    def _task_end(self, transport: Transport) -> None:
        s = self.state
        if self.method.task_end_grams:
            self._task_end_statistics(transport)
        if self.method.name != "regmean":  # RegMean's rounds already added their merged deltas
            s.past.append((s.A, s.B))
        if self.method.past_mode == "mean":
            deltas = s.sums.delta(self.run.ridge)
        else:
            deltas = delta_sum(s.past, self.exp.shapes, dtype=torch.float64)
        row, aware = evaluate_seen(self.exp, deltas, s.head_weight, s.head_bias, upto_task=s.task)
        s.acc.append(row)
        s.task_aware.append(aware)
        result = self.report.write_results(s.acc, {"tasks_done": s.task + 1}, s.task_aware)
        log(
            INFO,
            "[task %d/%d done] accuracy per task %s -> average %.2f%% (task-aware %.2f%%)",
            s.task + 1, len(self.exp.tasks), " ".join(f"{a:.1f}" for a in row), result["faa"],
            result.get("task_aware_faa", math.nan),
        )
        s.task += 1
        s.round = 0
        if s.task < len(self.exp.tasks):
            s.A, s.B = self._fresh_adapter(s.task)
        self._save()


# -- the methods' server merges of a round's adapter factors (the head is merged the same way for all) ----------
def _merge_lorm(strategy: LoRMStrategy, factor: str, trained: dict, grams: list[dict], counts: torch.Tensor) -> None:
    """The round's factor in closed form; the other one is shared and stays."""
    s = strategy.state
    shared = s.A if factor == "B" else s.B
    merged = merge_round(factor, shared, trained[factor], grams, strategy.run.ridge, strategy.merge_device,
                         projected=factor == "B")
    setattr(s, factor, _cpu32(merged))


def _merge_average(strategy: LoRMStrategy, factor: str, trained: dict, grams: list[dict], counts: torch.Tensor) -> None:
    """Each trained factor averaged by sample count (FedAvg-LoRA: A and B; FFA-LoRA: B)."""
    for f in factor:
        setattr(strategy.state, f, _cpu32(weighted_average(trained[f], counts)))


def _merge_regmean(strategy: LoRMStrategy, factor: str, trained: dict, grams: list[dict], counts: torch.Tensor) -> None:
    """RegMean of the clients' full deltas, kept exactly in low-rank form."""
    s, run = strategy.state, strategy.run
    # The round's merged delta joins the sum clients train on; the next round starts a fresh adapter.
    A_stack, B_stack = regmean_lowrank(trained["A"], trained["B"], grams, run.ridge)
    s.past.append((_cpu32(A_stack), _cpu32(B_stack)))
    s.A, s.B = init_adapter(strategy.exp.shapes, run.rank, seed=stable_seed(run.seed, s.task, s.round + 1))


RoundMerge = Callable[[LoRMStrategy, str, dict, list[dict], torch.Tensor], None]
SERVER_MERGES: dict[str, RoundMerge] = {
    "lorm": _merge_lorm,
    "fedavg-lora": _merge_average,
    "ffa-lora": _merge_average,
    "regmean": _merge_regmean,
}


def _cpu32(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merge's result as the state keeps it; a non-finite one stops the run instead of entering the model."""
    out = {name: t.to(torch.float32).cpu() for name, t in tensors.items()}
    for name, t in out.items():
        if not torch.isfinite(t).all():
            raise MergeError(f"merged {name} is not finite in float32; the state stays at the last round")
    return out


def _mean_upload(envelopes: list[Envelope]) -> float:
    sizes = [nbytes(content[0]) for _, content in envelopes if not isinstance(content, str)]
    return sum(sizes) / max(len(sizes), 1)

