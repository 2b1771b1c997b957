"""Fuzz: malformed replies mixed among valid ones never change the merge; each is dropped with a log line.

Valid replies come from nodes 0..3, each proving its own partition of K = 4; malformed ones from nodes 100+.
Mutations edit a reply's named tensors and manifest; ``_wire`` then packs them as a client would (schema 3), so
a tensor that changed size or that no manifest entry declares shows up in the packed layout."""

import itertools
import random

import pytest
import torch

from common.config import RunConfig
from common.experiment import build_experiment
from common.identity import Partition, PartitionBook, partition_samples
from common.model import HEAD
from common.lorm_manifest_pb2 import DENSE_PACKED, ROUND_ORDER, ROUND_REPLY, Manifest
from common.merges import project_gram
from common.layout import TRAIN
from common.methods.base import sum_terms
from common.protocol import MANIFEST_KEY, PACKED_KEY, ClientReply, RoundOrder, pack_arrays, read_message
from server.aggregation import PlainAggregation
from server.report import RunReport
from server.schedule import Schedule
from server.transport import RoundFailed

RUN = RunConfig(
    backbone="vit_tiny_test", img_size=32, num_tasks=2, max_train_per_class=4, max_test_per_class=2, rank=3,
    alpha_head=0.5, min_clients=1, num_partitions=4,
)
K = RUN.num_partitions


@pytest.fixture(scope="module")
def exp():
    return build_experiment(RUN, "", "cpu", "")


_RUNS = itertools.count()


def strategy(exp, tmp_path):
    """A fresh schedule with a report folder of its own."""
    return Schedule(exp, RunReport(tmp_path / f"run{next(_RUNS)}"), "fuzz", merge_device="cpu")


def order_and_spec(exp, s):
    """Task 0's first round (a B-round) as the schedule orders it, and its reply layout."""
    lo, hi = exp.block(0)
    order = RoundOrder(task=0, round=0, factor="B", block=(lo, hi), A=s.state.A, B=s.state.B)
    return order, RUN.method.reply_spec(TRAIN, "B", exp.dims, hi - lo)


def select(exp, s, envelopes):
    book = PartitionBook(exp.stream, RUN.beta, RUN.seed, K)
    return PlainAggregation(None, RUN.min_clients, book).select(envelopes, *order_and_spec(exp, s))


def merge(exp, s, accepted):
    """The method's merge of the accepted replies: B and the task's head block."""
    order, spec = order_and_spec(exp, s)
    terms = sum_terms([RUN.method.terms(order, r) for r in accepted], spec.terms)
    update = RUN.method.merge_round("B", terms, (s.state.A, s.state.B), RUN.ridge)
    return {**update.factors["B"], "head.weight": update.head_weight, "head.bias": update.head_bias}


def psd(d, n=None, gen=None):
    X = torch.randn(n or d + 3, d, dtype=torch.float64, generator=gen)
    return X.T @ X


def valid_reply(exp, s, gen, partition: int = 0, num_partitions: int = K) -> tuple[dict, dict]:
    """A B-round reply as a real client holding ``partition`` sends it (task 0, round 0), random but well-formed."""
    fingerprint, count = partition_samples(exp.stream, (0,), partition, num_partitions, RUN.beta, RUN.seed)
    lo, hi = exp.block(0)
    d = exp.model.head.in_features
    grams = {name: project_gram(s.state.A[name].double(), torch.rand(d_in, dtype=torch.float64, generator=gen))
             for name, (_, d_in) in exp.shapes.items()}
    grams[HEAD] = psd(d, gen=gen)
    reply = ClientReply(
        task=0, round=0, factor="B", num_examples=count, grams=grams,
        trained={"B": {name: torch.randn(d_out, RUN.rank, generator=gen) for name, (d_out, _) in exp.shapes.items()}},
        head_weight=torch.randn(hi - lo, d, generator=gen), head_bias=torch.randn(hi - lo, generator=gen),
        train_loss=1.0, projected=frozenset(exp.shapes), partition=Partition(partition, num_partitions, fingerprint),
    )
    return reply.to_wire(torch.float32)


def _named(arrays, config):
    """A valid reply's tensors by name, for a mutation to edit."""
    return read_message(arrays, config, ROUND_REPLY)[1], dict(config)


def _wire(arrays, config):
    """Named tensors packed back to back; every tensor the manifest declares gets the bytes it landed on (bytes
    of undeclared ones belong to no entry). A manifest that does not parse goes as it is."""
    packed, spans = pack_arrays(arrays)
    try:
        m = Manifest.FromString(config[MANIFEST_KEY])
    except Exception:
        return {PACKED_KEY: packed}, config
    where = {span.key: span for span in spans}
    for spec in m.tensors:
        if spec.key in where:
            spec.offset, spec.length = where[spec.key].offset, where[spec.key].length
    return {PACKED_KEY: packed}, {MANIFEST_KEY: m.SerializeToString()}


def _mutated(name, reply, gen):
    return _wire(*MUTATIONS[name](*_named(*reply), gen))


def _edit_manifest(config, edit):
    m = Manifest.FromString(config[MANIFEST_KEY])
    edit(m)
    return {MANIFEST_KEY: m.SerializeToString()}


def _retype(arrays, config, key, tensor):
    arrays[key] = tensor

    def edit(m):
        spec = next((s for s in m.tensors if s.key == key), None) or m.tensors.add(key=key)
        spec.shape[:] = list(tensor.shape)
        spec.dtype = str(tensor.dtype).removeprefix("torch.")

    return arrays, _edit_manifest(config, edit)


def _factor_key(arrays):
    return sorted(k for k in arrays if k.startswith("factor.B/"))[0]


def _set(field, value):
    def mutate(arrays, config, gen):
        return arrays, _edit_manifest(config, lambda m: setattr(m, field, value))
    return mutate


def _nan(arrays, config, gen):
    key = _factor_key(arrays)
    arrays[key] = arrays[key].clone()
    arrays[key].view(-1)[0] = float("nan")
    return arrays, config


def _inf_gram(arrays, config, gen):
    arrays["gram/head"] = arrays["gram/head"].clone()
    arrays["gram/head"][-1] = float("inf")
    return arrays, config


def _shape_declared(arrays, config, gen):
    key = _factor_key(arrays)
    return _retype(arrays, config, key, torch.zeros(arrays[key].shape[0] + 1, arrays[key].shape[1]))


def _shape_undeclared(arrays, config, gen):
    key = _factor_key(arrays)
    arrays[key] = torch.zeros(2, 2)
    return arrays, config


def _int_dtype(arrays, config, gen):
    key = _factor_key(arrays)
    return _retype(arrays, config, key, arrays[key].to(torch.int32))


def _missing(arrays, config, gen):
    key = _factor_key(arrays)
    del arrays[key]
    return arrays, _edit_manifest(config, lambda m: m.tensors.remove(next(s for s in m.tensors if s.key == key)))


def _extra_declared(arrays, config, gen):
    return _retype(arrays, config, "factor.B/blocks.9.evil", torch.ones(3, 3))


def _extra_undeclared(arrays, config, gen):
    arrays["gram/evil"] = torch.ones(3)
    return arrays, config


def _oversized(arrays, config, gen):
    return _retype(arrays, config, "factor.B/padding", torch.zeros(10_000_000, dtype=torch.float16))


def _not_psd(arrays, config, gen):
    g = arrays["gram/head"].clone()
    g[1] = 3 * (g[0].abs() + g[2].abs()) + 1  # packed (0, 1) entry breaks Cauchy-Schwarz
    arrays["gram/head"] = g
    return arrays, config


def _unprojected(arrays, config, gen):
    def edit(m):
        for spec in m.grams:
            if spec.layer != HEAD:
                spec.form = DENSE_PACKED
    return arrays, _edit_manifest(config, edit)


def _garbage(arrays, config, gen):
    return arrays, {MANIFEST_KEY: bytes(torch.randint(0, 256, (40,), generator=gen).tolist())}


def _no_manifest(arrays, config, gen):
    return arrays, {}


def _zero_samples(arrays, config, gen):
    return _set("num_examples", 0)(arrays, config, gen)


def _partition(**fields):
    def mutate(arrays, config, gen):
        def edit(m):
            for key, value in fields.items():
                setattr(m.partition, key, value)
        return arrays, _edit_manifest(config, edit)
    return mutate


def _duplicate(arrays, config, gen):
    """Partition 0's reply, exactly as its holder would send it: refused only because node 0 (or 1) has it."""
    fingerprint, count = partition_samples(build_experiment(RUN, "", "cpu", "").stream, (0,), 0, K, RUN.beta, RUN.seed)
    return _partition(partition_id=0, fingerprint=fingerprint)(*_set("num_examples", count)(arrays, config, gen), gen)


def _no_partition(arrays, config, gen):
    return arrays, _edit_manifest(config, lambda m: m.ClearField("partition"))


def _other_count(arrays, config, gen):
    return arrays, _edit_manifest(config, lambda m: setattr(m, "num_examples", m.num_examples + 1))


MUTATIONS = {
    "NaN factor": _nan,
    "Inf Gram": _inf_gram,
    "declared wrong shape": _shape_declared,
    "undeclared wrong shape": _shape_undeclared,
    "integer dtype": _int_dtype,
    "missing layer": _missing,
    "extra layer (declared)": _extra_declared,
    "extra layer (undeclared)": _extra_undeclared,
    "oversized": _oversized,
    "non-PSD Gram": _not_psd,
    "unprojected B-round Gram": _unprojected,
    "garbage manifest": _garbage,
    "no manifest": _no_manifest,
    "negative count": _set("num_examples", -5),
    "zero count with statistics": _zero_samples,
    "unknown schema version": _set("schema_version", 99),
    "wrong kind": _set("kind", ROUND_ORDER),
    "stale round": _set("round", 1),
    "stale task": _set("task", 1),
    "wrong factor": _set("factor", "A"),
    # what a node started with other partition settings or other data would send (a valid reply otherwise)
    "partition already held (node 0 has it)": _duplicate,
    "other num-partitions": _partition(num_partitions=K + 1),
    "partition-id out of range": _partition(partition_id=K, num_partitions=K),
    "samples not the partition's": _partition(fingerprint=bytes(16)),
    "sample count not the partition's": _other_count,
    "no partition": _no_partition,
}
# The reasons logged for the partition checks (server/aggregation.py, common/identity.py), when node 1 holds 0.
REASONS = {
    "partition already held (node 0 has it)": "claims partition 0/4: partition 0 is already held by node 1",
    "other num-partitions": "claims partition 1/5: the run has num-partitions 4",
    "partition-id out of range": "claims partition 4/4: partition-id out of range",
    "samples not the partition's": "claims partition 1/4: its samples are not the partition's",
    "sample count not the partition's": "samples, the partition has",
    "no partition": "reply carries no partition",
}


def test_every_malformed_reply_is_dropped_and_the_merge_equals_the_valid_ones(exp, tmp_path, caplog):
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    tried = {name: 0 for name in MUTATIONS}
    order = sorted(MUTATIONS) * 2
    rng.shuffle(order)
    per_trial = 5
    for trial in range(-(-len(order) // per_trial)):
        s = strategy(exp, tmp_path)
        valid = [valid_reply(exp, s, gen, i) for i in range(rng.randint(1, K))]
        envelopes = [(i, (dict(a), dict(c))) for i, (a, c) in enumerate(valid)]
        for j, name in enumerate(order[trial * per_trial : (trial + 1) * per_trial]):
            envelopes.append((100 + j, _mutated(name, valid_reply(exp, s, gen, rng.randrange(K)), gen)))
            tried[name] += 1
        envelopes.append((999, "client error: the node vanished"))
        rng.shuffle(envelopes)

        caplog.clear()
        accepted, dropped = select(exp, s, envelopes)
        assert (len(accepted), dropped) == (len(valid), len(envelopes) - len(valid))
        assert caplog.text.count("dropping node") == dropped
        got = merge(exp, s, accepted)

        ref_accepted, _ = select(exp, s, [(i, v) for i, v in enumerate(valid)])
        want = merge(exp, s, ref_accepted)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)
    assert min(tried.values()) >= 2, tried


def test_each_mutation_alone_is_refused_with_its_reason(exp, tmp_path, caplog):
    gen = torch.Generator().manual_seed(1)
    s = strategy(exp, tmp_path)
    good = valid_reply(exp, s, gen, 0)
    for name in MUTATIONS:
        mutated = _mutated(name, valid_reply(exp, s, gen, 1), gen)
        caplog.clear()
        accepted, dropped = select(exp, s, [(1, good), (2, mutated)])
        assert (len(accepted), dropped) == (1, 1), name
        assert "dropping node 2 (partition unknown)" in caplog.text, name
        assert REASONS.get(name, "") in caplog.text, (name, caplog.text)
    caplog.clear()
    select(exp, s, [(1, good), (2, "client error: out of memory")])
    assert "dropping node 2 (partition unknown) from task 0 round 0: client error: out of memory" in caplog.text


def test_too_few_valid_replies_fail_the_round(exp, tmp_path):
    s = strategy(exp, tmp_path)
    with pytest.raises(RoundFailed, match="0 valid replies"):
        select(exp, s, [(1, "client error: timeout")])
