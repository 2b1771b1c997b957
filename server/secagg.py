"""Server side of privacy = "secagg": every merge input arrives as a sum over clients, through Flower's SecAgg+.

``SecAggPlusSum`` runs Flower's own ``SecAggPlusWorkflow`` (four message rounds: keys, key shares, masked
vectors, unmasking) once per call, inside our schedule: the workflow wants a legacy strategy for its
configure_fit/aggregate_fit, so ``_OneExchange`` hands it this exchange's order and keeps the unmasked result.
Each client reports weight 1 (Flower sends the weight in clear, so it must not be the sample count) with
max_weight 1: the workflow's weighted mean is then the plain mean over the K clients that contributed, and K
times it is the sum. The sample count travels inside the masked vector, like every other statistic.

``SecureAggregation`` does each exchange of the schedule as probe + sum (see common/secagg.py) and hands the
method the summed terms, as ``PlainAggregation`` does with the terms of validated replies.
"""

from __future__ import annotations

import json
import secrets
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
from common.layout import ReplySpec
from common.methods import Method
from common.methods.base import COUNT_N
from common.protocol import MANIFEST_KEY, RoundOrder
from common.secagg import (
    EXCHANGE, EXPONENTS, KIND, PHASE, PROBE, SUM, SecAggError, decode, error_bound, exponents_from_probe, read_sum,
)
from common.wire import nbytes
from server.aggregation import Aggregate
from server.transport import RoundFailed, wait_for_nodes


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

    def __call__(self, config: dict, arrays: dict[str, Tensor] | None) -> SecureSum:
        self.calls += 1
        nodes = wait_for_nodes(self.grid, self.run.min_clients, self.run.round_timeout)
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


class SecureAggregation:
    """The aggregation of privacy "secagg": every exchange is a probe and a sum (common/secagg.py) through SecAgg+.

    A sum cannot be traced to a client, so it is validated as a whole (layout, Gram properties up to the
    quantisation noise, sample count) and a bad one fails the round.
    """

    def __init__(self, summer: SecAggPlusSum, run: RunConfig) -> None:
        self.summer, self.run = summer, run

    def exchange(self, order: RoundOrder, spec: ReplySpec, method: Method) -> Aggregate:
        where = order.where
        if not spec.summable:
            raise RoundFailed(f"{where}: {method.name}'s terms are not sums over clients; secure aggregation "
                              "cannot carry them")
        arrays, config = order.to_wire()
        layout = spec.wire_layout
        keys, exchange = sorted(layout), secrets.token_hex(8)
        probe = self.summer(
            {MANIFEST_KEY: config[MANIFEST_KEY], KIND: spec.kind, EXCHANGE: exchange, PHASE: PROBE}, arrays
        )
        T = self.run.secagg_quantization_range
        try:
            if len(probe.vectors) != 1:
                raise SecAggError(f"probe sum has {len(probe.vectors)} arrays, expected 1")
            exponents = exponents_from_probe(probe.vectors[0], keys)
            total = self.summer({KIND: spec.kind, EXCHANGE: exchange, PHASE: SUM, EXPONENTS: json.dumps(exponents)},
                                None)
            if total.clients < self.run.min_clients:
                raise RoundFailed(
                    f"{where}: {total.clients} clients in the secure sum, min-clients is {self.run.min_clients}"
                )
            bounds = {k: error_bound(exponents[k], total.clients, T) for k in keys}
            sums = read_sum(decode(total.vectors, exponents, layout), spec.terms, bounds)
        except SecAggError as err:
            raise RoundFailed(f"{where}: unusable secure sum: {err}") from None
        n = float(sums[COUNT_N].item())
        if not round(n) >= 1:
            raise RoundFailed(f"{where}: secure sum holds {n:.3g} samples")
        for f in total.failures:
            log(WARNING, "left out of %s's secure sum: %s", where, f)
        sums[COUNT_N] = torch.tensor([float(round(n))], dtype=torch.float64)
        return Aggregate(sums, total.clients, total.dropped, probe.masked_bytes + total.masked_bytes, nbytes(arrays))
