"""LoRM ClientApp: trains the round's factor and head block on local data and reports Gram statistics."""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from client.local import LocalWork
from common.lorm_manifest_pb2 import GRAMS_ORDER, ROUND_ORDER
from common.protocol import ClientReply, RoundOrder

app = ClientApp()


def _order(msg: Message, kind: int) -> RoundOrder:
    return RoundOrder.from_wire(msg.content["arrays"].to_torch_state_dict(), dict(msg.content["config"]), kind)


def _reply(msg: Message, reply: ClientReply, work: LocalWork) -> Message:
    arrays, config = reply.to_wire(work.gram_dtype)
    return Message(
        RecordDict({"arrays": ArrayRecord(torch_state_dict=arrays), "config": ConfigRecord(config)}), reply_to=msg
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: train the ordered factor + head block, then the Gram pass through the mean-delta model."""
    started = time.perf_counter()
    work = LocalWork.from_context(context)
    order = _order(msg, ROUND_ORDER)
    reply = work.train_round(order)
    log(
        INFO,
        "client %d: task %d round %d factor %s on %d samples, loss %.4f (%.1f s)",
        work.node.partition_id, order.task, order.round, order.factor, reply.num_examples, reply.train_loss,
        time.perf_counter() - started,
    )
    return _reply(msg, reply, work)


@app.query("grams")
def task_end_grams(msg: Message, context: Context) -> Message:
    """Task end: backbone Grams through W0 + mean of the task deltas, for the server's cross-task fold."""
    work = LocalWork.from_context(context)
    return _reply(msg, work.task_end_grams(_order(msg, GRAMS_ORDER)), work)

