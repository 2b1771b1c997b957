"""The Flower face of the server: a ``Strategy`` whose ``start`` runs the class-incremental schedule.

The schedule (server/schedule.py) does the work; this class picks the run's aggregation by its privacy setting
and hands it the grid. Flower's flat-round hooks are unused: the schedule drives its rounds itself and
evaluates centrally.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.config import RunConfig
from common.identity import PartitionBook
from server.aggregation import Aggregation, PlainAggregation
from server.schedule import Schedule
from server.secagg import SecAggPlusSum, SecureAggregation
from server.startup import check_nodes
from server.state import ServerState
from server.transport import FlowerTransport

AGGREGATIONS: dict[str, Callable[[Grid, RunConfig, PartitionBook], Aggregation]] = {
    "plain": lambda grid, run, partitions: PlainAggregation(
        FlowerTransport(grid, run.min_clients, run.round_timeout, run.reply_poll), run.min_clients, partitions
    ),
    "secagg": lambda grid, run, partitions: SecureAggregation(SecAggPlusSum(grid, run), run),
}


class FCILStrategy(Strategy):
    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def summary(self) -> None:
        pass  # the schedule logs its own summary when it starts

    def start(self, grid: Grid, *args, **kwargs) -> ServerState:  # type: ignore[override]
        """Check the SuperNodes, then run (or resume) the whole schedule over Flower; returns the final state.

        Overridden, signature and all: Flower's ``start`` is a loop of flat train/evaluate rounds over one
        ArrayRecord, with no room for tasks, Gram queries or secure sums, and without the override (``main``
        calling the schedule itself) this Strategy would be left with nothing to do: dead code."""
        run = self.schedule.config
        check_nodes(FlowerTransport(grid, run.min_clients, run.round_timeout, run.reply_poll), self.schedule)
        return self.schedule.run(AGGREGATIONS[run.privacy](grid, run, self.schedule.partitions))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list:
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[None, None]:
        return None, None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> None:
        return None
