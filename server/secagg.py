"""Server side of privacy = "secagg": every merge input arrives as a sum over clients, through Flower's SecAgg+.

``SecAggPlusSum`` runs Flower's own ``SecAggPlusWorkflow`` (four message rounds: keys, key shares, masked
vectors, unmasking) once per call, inside our schedule: the workflow wants a legacy strategy for its
configure_fit/aggregate_fit, so ``_OneExchange`` hands it this exchange's order and keeps the unmasked result.
Each client reports weight 1 (Flower sends the weight in clear, so it must not be the sample count) with
max_weight 1: the workflow's weighted mean is then the plain mean over the K clients that contributed, and K
times it is the sum. The sample count travels inside the masked vector, like every other statistic.

``SecAggLoRMStrategy`` is the LoRM schedule with each exchange done as probe + sum (see common/secagg.py) and
merged from the sums. A sum cannot be traced to a client, so it is validated as a whole (layout, Gram
properties up to the quantisation noise, sample count) and a bad one fails the round.
"""

from __future__ import annotations

import json
import secrets
import time
from logging import WARNING
from typing import NamedTuple

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, Parameters, ndarray_to_bytes, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid
from torch import Tensor

from common.config import RunConfig
from common.merges import MergeError, RoundSums, head_from_sums
from common.protocol import GRAMS, MANIFEST_KEY, TRAIN
from common.secagg import (
    COUNT_N, COUNT_NLOSS, EXCHANGE, EXPONENTS, KIND, PHASE, PROBE, SUM, SecAggError, check_gram_sum, decode,
    drop_noise_features, error_bound, exponents_from_probe, full, round_layout, task_end_layout, unpack,
)
from server.state import ServerState
from common.wire import nbytes
from server.strategy import LoRMStrategy, _cpu32
from server.transport import RoundFailed


class SecureSum(NamedTuple):
    vectors: list[np.ndarray]  # the sum over contributing clients of each array they sent
    clients: int
    dropped: int  # nodes asked that did not contribute
    failures: list[str]
    masked_bytes: int  # what one client uploaded as masked integers


class _OneExchange(LegacyStrategy):
    """The legacy-strategy face SecAggPlusWorkflow needs: one fixed order out, the unmasked result kept."""

    def __init__(self, instructions: list) -> None:
        self.instructions, self.results, self.failures = instructions, None, []

    def configure_fit(self, server_round, parameters, client_manager):
        return self.instructions

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = results, failures
        return None, {}  # nothing for the workflow to store: the caller reads self.results

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Workflow(SecAggPlusWorkflow):
    def setup_stage(self, grid, context, state) -> bool:
        self.last_state = state  # to report who failed when the protocol halts before aggregate_fit
        return super().setup_stage(grid, context, state)


def _share_setting(value: float) -> int | float:
    """Flower's convention: a float <= 1 is a fraction of the clients, an integer a count."""
    return float(value) if value <= 1 else int(value)


def _reason(failure: BaseException) -> str:
    error = failure.args[0] if failure.args else failure
    return str(getattr(error, "reason", error))


class SecAggPlusSum:
    """One SecAgg+ run per call: the sum over the connected clients of the vector each one returns."""

    def __init__(self, grid: Grid, run: RunConfig) -> None:
        self.grid, self.run, self.calls = grid, run, 0

    def _nodes(self) -> list[int]:
        deadline = time.monotonic() + self.run.round_timeout
        while len(nodes := sorted(self.grid.get_node_ids())) < self.run.min_clients:
            if time.monotonic() > deadline:
                raise RoundFailed(f"only {len(nodes)} SuperNodes connected, min-clients is {self.run.min_clients}")
            time.sleep(1.0)
        return nodes

    def __call__(self, config: dict, arrays: dict[str, Tensor] | None) -> SecureSum:
        self.calls += 1
        nodes = self._nodes()
        T = self.run.secagg_quantization_range
        tensors = [ndarray_to_bytes(arrays[k].numpy()) for k in sorted(arrays)] if arrays else []
        fitins = FitIns(Parameters(tensors=tensors, tensor_type="numpy.ndarray"), config)
        adapter = _OneExchange([(GridClientProxy(node, self.grid, 0), fitins) for node in nodes])
        context = LegacyContext(Context(0, 0, {}, RecordDict(), {}), strategy=adapter)
        context.state.config_records["config"] = ConfigRecord({"current_round": self.calls})
        context.state.array_records["parameters"] = ArrayRecord()
        workflow = _Workflow(
            _share_setting(self.run.secagg_num_shares),
            _share_setting(self.run.secagg_reconstruction_threshold),
            max_weight=1.0,  # with weight 1 per client, each value is quantised as sent
            clipping_range=1.0,  # common/secagg.py scales every value into [-1, 1]
            quantization_range=T,
            # the sum of len(nodes) values in [0, T] (and of the weights, T each) must not wrap around
            modulus_range=1 << ((len(nodes) + 1) * T).bit_length(),
            timeout=self.run.round_timeout,
        )
        workflow(self.grid, context)
        state = getattr(workflow, "last_state", None)
        failures = list(dict.fromkeys(_reason(f) for f in (state.failures if state else [])))  # stages repeat them
        if adapter.results is None:
            raise RoundFailed(f"SecAgg+ halted with {len(nodes)} nodes (too few left for its threshold?): {failures}")
        clients = len(adapter.results)
        mean = parameters_to_ndarrays(adapter.results[0][1].parameters)
        return SecureSum(
            [a * clients for a in mean], clients, len(nodes) - clients, failures, 8 * (sum(a.size for a in mean) + 1)
        )


class SecAggLoRMStrategy(LoRMStrategy):
    """LoRM whose merges see only sums over clients (the run's privacy is "secagg")."""

    def start(self, grid: Grid, *args, **kwargs) -> ServerState:  # type: ignore[override]
        return self.run_schedule(SecAggPlusSum(grid, self.run))

    def _secure_exchange(self, summer, kind: str, factor: str, layout: dict) -> tuple[dict[str, Tensor], dict, dict]:
        """Probe, then sum; returns (summed arrays, error bound per array, the round's record fields)."""
        s = self.state
        arrays, config = self._order(factor).to_wire()
        keys, exchange = sorted(layout), secrets.token_hex(8)
        probe = summer({MANIFEST_KEY: config[MANIFEST_KEY], KIND: kind, EXCHANGE: exchange, PHASE: PROBE}, arrays)
        try:
            if len(probe.vectors) != 1:
                raise SecAggError(f"probe sum has {len(probe.vectors)} arrays, expected 1")
            exponents = exponents_from_probe(probe.vectors[0], keys)
            total = summer({KIND: kind, EXCHANGE: exchange, PHASE: SUM, EXPONENTS: json.dumps(exponents)}, None)
            if total.clients < self.run.min_clients:
                raise RoundFailed(
                    f"task {s.task} round {s.round}: {total.clients} clients in the secure sum, "
                    f"min-clients is {self.run.min_clients}"
                )
            sums = decode(total.vectors, exponents, layout)
        except SecAggError as err:
            raise RoundFailed(f"task {s.task} round {s.round}: unusable secure sum: {err}") from None
        T = self.run.secagg_quantization_range
        bounds = {k: error_bound(exponents[k], total.clients, T) for k in keys}
        n = float(sums[COUNT_N].item())
        if not round(n) >= 1:
            raise RoundFailed(f"task {s.task} round {s.round}: secure sum holds {n:.3g} samples")
        for f in total.failures:
            log(WARNING, "left out of task %d round %d's secure sum: %s", s.task, s.round, f)
        record = {
            "clients": total.clients, "dropped": total.dropped,
            "train_loss": float(sums[COUNT_NLOSS].item()) / round(n) if COUNT_NLOSS in sums else float("nan"),
            "uplink_bytes_per_client": probe.masked_bytes + total.masked_bytes,
            "downlink_bytes_per_client": nbytes(arrays),
        }
        return sums | {COUNT_N: torch.tensor([float(round(n))], dtype=torch.float64)}, bounds, record

    def _round(self, transport, factor: str) -> dict:
        s, exp = self.state, self.exp
        lo, hi = exp.block(s.task)
        layout = round_layout(exp.shapes, self.run.rank, factor, hi - lo, exp.model.head.in_features, exp.gram_dense)
        sums, bounds, record = self._secure_exchange(transport, TRAIN, factor, layout)
        started = time.perf_counter()
        den_dense = {name: True for name in exp.shapes} if factor == "B" else exp.gram_dense  # B: A G A^T, r x r
        num, den = unpack(sums, "num/", {}), unpack(sums, "den/", den_dense)
        head_G = full(sums["head/G"], exp.gram_dense["head"])
        try:
            for name in exp.shapes:
                check_gram_sum(f"den/{name}", den[name], bounds[f"den/{name}"])
                num[name], den[name] = drop_noise_features(num[name], den[name], bounds[f"den/{name}"])
            check_gram_sum("head/G", head_G, bounds["head/G"])
            WG, head_G = drop_noise_features(sums["head/WG"], head_G, bounds["head/G"])
            merge = RoundSums(factor, s.A if factor == "B" else s.B, self.merge_device)  # type: ignore[arg-type]
            merge.add_terms(num, den)
            merged = _cpu32(merge.solve(self.run.ridge))
            W, b = head_from_sums(WG, head_G, sums["head/nb"], float(sums[COUNT_N].item()), self.run.ridge)
            head = _cpu32({"head weight": W, "head bias": b})
        except (SecAggError, MergeError) as err:
            raise RoundFailed(f"task {s.task} round {s.round}: unusable secure sum: {err}") from None
        setattr(s, factor, merged)
        s.head_weight[lo:hi] = head["head weight"]
        s.head_bias[lo:hi] = head["head bias"]
        return record | {"merge_s": time.perf_counter() - started}

    def _task_end_statistics(self, transport) -> None:
        layout = task_end_layout(self.exp.shapes, self.exp.gram_dense)
        sums, bounds, _ = self._secure_exchange(transport, GRAMS, "", layout)
        grams = unpack(sums, "gram/", self.exp.gram_dense)
        try:
            for name, G in grams.items():
                check_gram_sum(f"gram/{name}", G, bounds[f"gram/{name}"])
        except SecAggError as err:
            raise RoundFailed(f"task {self.state.task} end: unusable secure sum: {err}") from None
        self.state.sums.fold(self.state.A, self.state.B, grams)
