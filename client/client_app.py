"""LoRM ClientApp: trains the round's factor and head block on local data and reports Gram statistics."""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from client.local import LocalWork
from client.secagg import privacy, privacy_mod, secure_train

app = ClientApp()


def _handle(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    work = LocalWork.from_context(context)
    arrays, config = work.respond(
        msg.metadata.message_type, msg.content["arrays"].to_torch_state_dict(), dict(msg.content["config"])
    )
    log(INFO, "node %d (partition %d/%d): %s in %.1f s", context.node_id, work.node.partition_id,
        work.node.num_partitions, work.last_summary, time.perf_counter() - started)
    return Message(
        RecordDict({"arrays": ArrayRecord(torch_state_dict=arrays), "config": ConfigRecord(config)}), reply_to=msg
    )


# privacy_mod routes through Flower's secaggplus_mod when the run's privacy is "secagg" (a mod list is fixed
# when the app is built, the run config is known only per message) and refuses plain messages then.
@app.train(mods=[privacy_mod])
def train(msg: Message, context: Context) -> Message:
    """One round: train the ordered factor + head block, then the Gram pass through the mean-delta model."""
    if privacy(context) == "secagg":
        return secure_train(msg, context)  # a round or a task end, inside SecAgg+'s collect stage
    return _handle(msg, context)


@app.query("grams", mods=[privacy_mod])
def task_end_grams(msg: Message, context: Context) -> Message:
    """Task end: backbone Grams through W0 + mean of the task deltas, for the server's cross-task fold."""
    return _handle(msg, context)


@app.query("head", mods=[privacy_mod])
def task_end_head_sums(msg: Message, context: Context) -> Message:
    """Task end, head = "analytic": the head inputs' sums through W0, for the server's ridge head."""
    return _handle(msg, context)


@app.query("check", mods=[privacy_mod])
def start_up_check(msg: Message, context: Context) -> Message:
    """Before the first round: this node's settings and data are checked, and it says which partition it holds."""
    return _handle(msg, context)
