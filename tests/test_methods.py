"""The method plug-ins: each one's terms match its layout, its merges match an independent computation, and a
new method is one class that the whole schedule runs without any other change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.layout import GRAMS, TRAIN, Dims, Term
from common.methods import METHODS, Method, register_method
from common.methods.base import COUNT_N, CrossTask, sum_terms
from common.protocol import ClientReply, RoundOrder

LAYERS = {"qkv": (9, 4), "fc2": (4, 6)}  # name -> (d_out, d_in)
R, HEAD_D, ROWS = 2, 5, 3


def _dims(dense: bool) -> Dims:
    return Dims(LAYERS, R, HEAD_D, {name: dense for name in LAYERS} | {"head": True})


def _gram(gen: torch.Generator, d: int, dense: bool) -> torch.Tensor:
    X = torch.randn(3 * d, d, dtype=torch.float64, generator=gen)
    return X.T @ X if dense else (X * X).sum(0)


def _reply(method: Method, kind: str, factor: str, dims: Dims, gen: torch.Generator, n: int) -> ClientReply:
    """A well-formed reply of the spec's shapes, random values."""
    spec = method.reply_spec(kind, factor, dims, ROWS)
    grams = {name: _gram(gen, slot.side, len(slot.shape) == 2) for name, slot in spec.grams.items()}
    trained = {f: {name: torch.randn(dims.factor_shape(f, name), generator=gen) for name in LAYERS} for f in factor}
    head = (torch.randn(ROWS, HEAD_D, generator=gen), torch.randn(ROWS, generator=gen)) if factor else (None, None)
    return ClientReply(0, 0, factor, n, grams, trained, *head, train_loss=0.5, projected=spec.projected)


def _order(factor: str, gen: torch.Generator) -> RoundOrder:
    A = {name: torch.randn(R, d_in, generator=gen) for name, (_, d_in) in LAYERS.items()}
    B = {name: torch.randn(d_out, R, generator=gen) for name, (d_out, _) in LAYERS.items()}
    return RoundOrder(task=0, round=0, factor=factor, block=(0, ROWS), A=A, B=B)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("dense", [False, True])
def test_every_method_sends_exactly_the_terms_its_layout_states(name, dense):
    method, gen, dims = METHODS[name], torch.Generator().manual_seed(0), _dims(dense)
    steps = [(TRAIN, f) for f in sorted(set(method.schedule(4)))] + [(GRAMS, "")] * method.task_end_grams
    assert steps, name
    for kind, factor in steps:
        spec = method.reply_spec(kind, factor, dims, ROWS)
        terms = method.terms(_order(factor, gen), _reply(method, kind, factor, dims, gen, 7))
        assert {k: tuple(t.shape) for k, t in terms.items()} == {k: t.shape for k, t in spec.terms.items()}
        assert all(t.dtype == torch.float64 for t in terms.values())
        assert all(key in spec.terms for key in (t.over for t in spec.terms.values() if t.over))
        assert spec.max_bytes > 8 * sum(t.numel() for t in _reply(method, kind, factor, dims, gen, 7).grams.values())


def test_averaging_methods_are_fedavg_weighted_by_samples():
    gen = torch.Generator().manual_seed(1)
    for name, factor in (("fedavg-lora", "AB"), ("ffa-lora", "B")):
        method, dims = METHODS[name], _dims(False)
        order = _order(factor, gen)
        counts = [3, 10, 1]
        replies = [_reply(method, TRAIN, factor, dims, gen, n) for n in counts]
        spec = method.reply_spec(TRAIN, factor, dims, ROWS)
        update = method.merge_round(factor, sum_terms([method.terms(order, r) for r in replies], spec.terms),
                                    (order.A, order.B), 0.0)
        w = np.array(counts) / sum(counts)
        for f in factor:
            for layer in LAYERS:
                want = sum(wi * r.trained[f][layer].double().numpy() for wi, r in zip(w, replies))
                np.testing.assert_allclose(update.factors[f][layer].numpy(), want, rtol=1e-12)
        np.testing.assert_allclose(update.head_weight.numpy(), sum(wi * r.head_weight.double().numpy()
                                                                   for wi, r in zip(w, replies)), rtol=1e-12)
        assert set(update.factors) == set(factor) and update.finished is None


def test_regmean_plug_in_is_regmean_of_the_full_deltas():
    gen = torch.Generator().manual_seed(2)
    method, dims = METHODS["regmean"], _dims(True)
    order = _order("AB", gen)
    replies = [_reply(method, TRAIN, "AB", dims, gen, n) for n in (4, 9)]
    spec = method.reply_spec(TRAIN, "AB", dims, ROWS)
    update = method.merge_round("AB", sum_terms([method.terms(order, r) for r in replies], spec.terms),
                                (order.A, order.B), 0.0)
    assert update.factors == {} and update.finished is not None
    A_stack, B_stack = update.finished
    for layer in LAYERS:
        G = [r.grams[layer].numpy() for r in replies]
        deltas = [(r.trained["B"][layer].double() @ r.trained["A"][layer].double()).numpy() for r in replies]
        want = sum(d @ g for d, g in zip(deltas, G)) @ np.linalg.inv(sum(G))
        np.testing.assert_allclose((B_stack[layer] @ A_stack[layer]).numpy(), want, rtol=1e-9, atol=1e-12)
    assert not spec.summable and not method.summable  # stacked terms: secure aggregation cannot carry them


def test_lorm_task_end_returns_new_sums_and_leaves_the_given_ones_as_they_were():
    gen = torch.Generator().manual_seed(3)
    order = _order("B", gen)
    grams = {name: _gram(gen, d_in, False) for name, (_, d_in) in LAYERS.items()}
    first = METHODS["lorm"].end_task((order.A, order.B), CrossTask(), grams)
    before = {key: {n: t.clone() for n, t in sums.items()} for key, sums in first.sums.state_dict().items()}
    second = METHODS["lorm"].end_task((order.A, order.B), first, grams)
    assert len(first.past) == 1 and len(second.past) == 2
    for key, sums in first.sums.state_dict().items():
        assert sums.keys() == before[key].keys() and all(torch.equal(t, before[key][n]) for n, t in sums.items())
        for name, t in second.sums.state_dict()[key].items():
            torch.testing.assert_close(t, 2 * before[key][name])  # the same task folded twice


def test_a_new_method_is_one_registered_class_and_runs_the_whole_schedule(tmp_path):
    """Alternating FedAvg (B, A, B, ...: each factor averaged, never both at once): defined here and nowhere else."""
    from common.methods.averaging import Averaging
    from deploy.inprocess import InProcessTransport, run_in_process, schedule_for

    class AlternatingFedAvg(Averaging):
        name = "alternating-fedavg"

        def schedule(self, rounds: int) -> list[str]:
            return ["B" if r % 2 == 0 else "A" for r in range(rounds)]

    register_method(AlternatingFedAvg)
    try:
        run = RunConfig(strategy="alternating-fedavg", backbone="vit_tiny_test", img_size=32, classes_per_task=5,
                        num_tasks=2, rounds_per_task=2, local_epochs=1, max_train_per_class=6, max_test_per_class=4,
                        rank=2, seed=1)
        state = run_in_process(schedule_for(run, tmp_path / "new"), InProcessTransport(run, 2))
    finally:
        del METHODS["alternating-fedavg"]
    assert [h["factor"] for h in state.history] == ["B", "A", "B", "A"]
    assert [len(row) for row in state.acc] == [1, 2] and len(state.past) == 2
    assert all(h["clients"] == 2 and h["dropped"] == 0 for h in state.history)


def test_a_method_registered_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register_method(type(METHODS["lorm"]))


def test_term_wire_shapes_pack_only_dense_grams():
    assert Term((4, 4), gram=True).wire_shape == (10,)
    assert Term((4,), gram=True).wire_shape == (4,)
    assert Term((3, 4)).wire_shape == (3, 4)
    assert COUNT_N in METHODS["lorm"].reply_spec(GRAMS, "", _dims(False), ROWS).terms
