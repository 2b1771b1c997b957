"""LoRM ClientApp: trains the round's factor and head block on local data and reports Gram statistics."""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from client.local import LocalWork

app = ClientApp()


def _handle(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    work = LocalWork.from_context(context)
    arrays, config = work.respond(
        msg.metadata.message_type, msg.content["arrays"].to_torch_state_dict(), dict(msg.content["config"])
    )
    log(INFO, "client %d: %s in %.1f s", work.node.partition_id, work.last_summary, time.perf_counter() - started)
    return Message(
        RecordDict({"arrays": ArrayRecord(torch_state_dict=arrays), "config": ConfigRecord(config)}), reply_to=msg
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: train the ordered factor + head block, then the Gram pass through the mean-delta model."""
    return _handle(msg, context)


@app.query("grams")
def task_end_grams(msg: Message, context: Context) -> Message:
    """Task end: backbone Grams through W0 + mean of the task deltas, for the server's cross-task fold."""
    return _handle(msg, context)
