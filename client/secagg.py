"""Client side of privacy = "secagg": Flower's secaggplus_mod masks what this node sends; nothing else leaves it.

Every exchange is two SecAgg+ runs (see common/secagg.py): in the *probe* the node does its work (trains the
round, or the task-end Gram pass), keeps its terms in the node's Flower context and sends only one-hot exponent
rows; in the *sum* it sends its terms scaled by the agreed powers of two. Both go out through secaggplus_mod,
which quantises and masks them, so the server sees only sums. The reply's unmasked fields (sample count,
metrics) are constants: Flower sends them in clear.
"""

from __future__ import annotations

import json
import time
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.local import LocalWork
from common.config import RunConfig
from common.layout import CHECK, TRAIN
from common.protocol import MANIFEST_KEY, PACKED_KEY
from common.secagg import EXCHANGE, EXPONENTS, KIND, PHASE, PROBE, SUM, SecAggError, encode, probe, wire_terms

_TERMS, _META = "lorm.secagg.terms", "lorm.secagg.exchange"


class PrivacyError(RuntimeError):
    """A message that would make this node send statistics another way than the run's privacy mode allows."""


def privacy(context: Context) -> str:
    return RunConfig.parse(context.run_config, source="run config").privacy


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Under "secagg", answer only SecAgg+ train messages, through secaggplus_mod, and the start-up check, which
    carries no statistics (the node withholds its partition there); refuse anything else, so no server-side slip
    can make this node send its statistics in clear."""
    secure = msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records
    if msg.metadata.message_type == CHECK and not secure:
        return call_next(msg, context)
    if privacy(context) == "secagg":
        if msg.metadata.message_type != TRAIN or not secure:
            raise PrivacyError(
                f"privacy is 'secagg': this node answers only SecAgg+ train messages, not {msg.metadata.message_type!r}"
            )
        return secaggplus_mod(msg, context, call_next)
    if secure:
        raise PrivacyError("a SecAgg+ message in a run whose privacy is 'plain'")
    return call_next(msg, context)


def secure_train(msg: Message, context: Context) -> Message:
    """The SecAgg+ collect stage's inner call: this node's probe rows or scaled terms, as a legacy FitRes."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = fitins.config
    phase, exchange = cfg[PHASE], str(cfg[EXCHANGE])
    if phase == PROBE:
        terms = _contribution(context, str(cfg[KIND]), fitins.parameters, cfg[MANIFEST_KEY])
        context.state.array_records[_TERMS] = ArrayRecord(torch_state_dict=terms)
        context.state.config_records[_META] = ConfigRecord({"exchange": exchange})
        vector = [probe(terms, sorted(terms))]
    elif phase == SUM:
        cached = context.state.config_records.get(_META)
        if cached is None or cached["exchange"] != exchange:
            raise SecAggError(f"no terms kept for exchange {exchange} (was the probe missed?)")
        terms = context.state.array_records[_TERMS].to_torch_state_dict()
        exponents = json.loads(str(cfg[EXPONENTS]))
        if set(exponents) != set(terms):
            raise SecAggError("the server's exponents name other arrays than this node's terms")
        vector = encode(terms, exponents, sorted(terms))
        del context.state.array_records[_TERMS], context.state.config_records[_META]
    else:
        raise SecAggError(f"unknown secure-aggregation phase {phase!r}")
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), num_examples=1, metrics={})
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def _contribution(context: Context, kind: str, parameters, manifest: bytes) -> dict[str, torch.Tensor]:
    """This node's work for the order, as the method's terms in their wire shapes."""
    started = time.perf_counter()
    work = LocalWork.from_context(context)
    # The order's wire form (common/protocol.py) is its one packed array, sent as the FitIns' only tensor.
    packed = [torch.from_numpy(a.copy()) for a in parameters_to_ndarrays(parameters)]
    arrays = dict(zip([PACKED_KEY], packed, strict=True))
    order, spec, reply = work.answer(kind, arrays, {MANIFEST_KEY: manifest})
    terms = wire_terms(work.run.method.terms(order, reply), spec.terms)
    log(INFO, "node %d (partition %d/%d, secagg): %s in %.1f s", context.node_id, work.node.partition_id,
        work.node.num_partitions, work.last_summary, time.perf_counter() - started)
    return terms
