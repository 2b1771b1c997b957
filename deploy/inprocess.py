"""An in-process federation: the server's schedule against K LocalWork clients in one process, no Flower runtime.

For tests (faults injected per call) and for quick method comparisons (bench/compare_strategies.py
--in-process). Orders and replies go through the same wire form (``LocalWork.respond``) as over Flower, so the
merges, the validation and the byte counts are those of a real run; only Flower's transport and process
start-up are missing. A client whose ``respond`` raises becomes a "client error" envelope, as Flower turns a
crashed ClientApp into an error reply.
"""

from __future__ import annotations

from collections.abc import Callable

from client.local import LocalWork
from common.config import ConfigError, NodeConfig, RunConfig
from common.experiment import build_experiment
from server.aggregation import PlainAggregation
from server.report import RunReport
from server.schedule import Schedule
from server.startup import check_nodes
from server.state import ServerState
from server.transport import CLIENT_ERROR, Envelope

# fault(call index, node, kind) -> None, or an exception to raise in that client (or "absent": no reply at all);
# call 0 is the start-up check (server/startup.py), then one call per round and task end.
Fault = Callable[[int, int, str], "Exception | str | None"]


class InProcessTransport:
    def __init__(self, run: RunConfig, num_clients: int, fault: Fault | None = None) -> None:
        self.works = [
            LocalWork.create(run, NodeConfig(partition_id=i, num_partitions=num_clients, cache_dir=""))
            for i in range(num_clients)
        ]
        self.fault = fault
        self.calls = 0

    def exchange(self, kind: str, arrays: dict, config: dict, max_reply_bytes: int) -> list[Envelope]:
        call, self.calls = self.calls, self.calls + 1
        replies: list[Envelope] = []
        for node, work in enumerate(self.works):
            failure = self.fault(call, node, kind) if self.fault else None
            if failure == "absent":
                continue
            try:
                if isinstance(failure, BaseException):
                    raise failure
                replies.append((node, work.respond(kind, {k: v.clone() for k, v in arrays.items()}, dict(config))))
            except Exception as err:
                replies.append((node, f"{CLIENT_ERROR}: {err}"))
        return replies


def schedule_for(run: RunConfig, folder, fingerprint: str = "test") -> Schedule:
    return Schedule(build_experiment(run, "", "cpu", ""), RunReport(folder), fingerprint, merge_device="cpu")


def run_in_process(schedule: Schedule, transport: InProcessTransport) -> ServerState:
    """The start-up check and the schedule against in-process clients (plain aggregation); returns the final state."""
    if schedule.config.privacy != "plain":  # running it plain would quietly drop the privacy the config asked for
        raise ConfigError(
            f"run config privacy={schedule.config.privacy!r}: the in-process federation has plain aggregation only; "
            "run secure aggregation in the simulation (bash scripts/simulate.sh)"
        )
    check_nodes(transport, schedule)
    return schedule.run(PlainAggregation(transport, schedule.config.min_clients, schedule.partitions))
