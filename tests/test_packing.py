"""Schema 3: every message's tensors travel as one uint8 array whose byte layout is in the manifest.

Each message kind survives the round trip exactly; a layout that cannot describe the packed bytes (out of range,
overlapping, a dtype the protocol does not carry, a shape that does not fill its bytes, bytes nobody declared,
an array declared twice) is refused with a ProtocolError naming the array; a peer of schema 2 is told both
versions."""

from __future__ import annotations

import pytest
import torch

from common.identity import Partition
from common.lorm_manifest_pb2 import (
    CHECK_ORDER, CHECK_REPLY, GRAMS_ORDER, GRAMS_REPLY, ROUND_ORDER, ROUND_REPLY, Manifest,
)
from common.protocol import (
    MANIFEST_KEY, PACKED_KEY, SCHEMA_VERSION, ClientReply, NodeCheck, ProtocolError, RoundOrder, check_order,
    read_manifest, read_message,
)

PART = Partition(2, 3, bytes(range(16)))


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(13)


def _order(factor: str = "A") -> RoundOrder:
    g = _gen()
    head = {} if not factor else dict(head_weight=torch.randn(4, 6, generator=g), head_bias=torch.randn(4, generator=g))
    return RoundOrder(
        task=1, round=1, factor=factor, block=(4, 8), A={"l1": torch.randn(2, 6, generator=g)},
        B={"l1": torch.randn(5, 2, generator=g)},
        past=[({"l1": torch.randn(2, 6, generator=g)}, {"l1": torch.randn(5, 2, generator=g)})], **head,
    )


def _reply(factor: str = "A") -> ClientReply:
    g = _gen()
    x = torch.randn(9, 6, dtype=torch.float64, generator=g)
    head = {} if not factor else dict(head_weight=torch.randn(4, 6, generator=g), head_bias=torch.randn(4, generator=g))
    return ClientReply(
        task=1, round=1, factor=factor, num_examples=9, partition=PART, train_loss=0.25,
        grams={"l1": (x ** 2).sum(0), "l2": x.T @ x}, trained={"A": {"l1": torch.randn(2, 6, generator=g)}} if factor else {},
        **head,
    )


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_every_message_kind_is_one_uint8_array_and_round_trips_exactly():
    for factor, kind in (("A", ROUND_ORDER), ("", GRAMS_ORDER)):
        order = _order(factor)
        arrays, config = order.to_wire()
        assert list(arrays) == [PACKED_KEY] and arrays[PACKED_KEY].dtype == torch.uint8
        back = RoundOrder.from_wire(arrays, config, kind)
        for got, sent in ((back.A, order.A), (back.B, order.B), (back.past[0][0], order.past[0][0]),
                          (back.past[0][1], order.past[0][1])):
            _assert_equal(got, sent)
        assert (back.head_weight is None) == (not factor)
        if factor:
            assert torch.equal(back.head_weight, order.head_weight) and torch.equal(back.head_bias, order.head_bias)
    for factor, kind in (("A", ROUND_REPLY), ("", GRAMS_REPLY)):
        reply = _reply(factor)
        arrays, config = reply.to_wire(torch.float64)
        assert list(arrays) == [PACKED_KEY]
        back = ClientReply.from_wire(arrays, config, kind)
        _assert_equal(back.grams, reply.grams)
        assert back.trained.keys() == reply.trained.keys() and back.partition == PART
        if factor:
            _assert_equal(back.trained["A"], reply.trained["A"])
            assert torch.equal(back.head_weight, reply.head_weight)
    arrays, config = check_order()
    assert arrays[PACKED_KEY].numel() == 0 and read_manifest(arrays, config, CHECK_ORDER).kind == CHECK_ORDER
    check = NodeCheck(PART, 37)
    arrays, config = check.to_wire()
    assert arrays[PACKED_KEY].numel() == 0 and NodeCheck.from_wire(arrays, config) == check


def test_the_packed_bytes_are_exactly_the_tensors_bytes():
    """The reply-size limits and the byte counts in rounds.csv count data bytes: packing adds none."""
    reply = _reply()
    arrays, config = reply.to_wire(torch.float32)
    tensors = read_message(arrays, config, ROUND_REPLY)[1]
    assert arrays[PACKED_KEY].numel() == sum(t.numel() * t.element_size() for t in tensors.values())


def _edit(config: dict, edit) -> dict:
    m = Manifest.FromString(config[MANIFEST_KEY])
    edit(m)
    return {MANIFEST_KEY: m.SerializeToString()}


def _spec(m: Manifest, key: str):
    return next(s for s in m.tensors if s.key == key)


def _set_fields(key: str, **fields):
    def edit(m):
        spec = _spec(m, key)
        for name, value in fields.items():
            if name == "shape":
                spec.shape[:] = value
            else:
                setattr(spec, name, value)
    return edit


def _duplicate(key: str):
    def edit(m):
        m.tensors.add().CopyFrom(_spec(m, key))
    return edit


def _drop(key: str):
    def edit(m):
        m.tensors.remove(_spec(m, key))
    return edit


def _layout(config: dict) -> dict:
    return {s.key: s for s in Manifest.FromString(config[MANIFEST_KEY]).tensors}


CASES = ("past the end", "negative offset", "negative length", "dtype not carried", "unknown dtype",
         "shape larger than bytes", "negative dimension", "dtype of another size", "overlap", "declared twice",
         "bytes nobody declared")


@pytest.mark.parametrize("case", CASES)
def test_each_impossible_layout_is_refused_naming_the_array(case):
    arrays, config = _order().to_wire()
    layout = _layout(config)
    size = arrays[PACKED_KEY].numel()
    first, second = sorted(layout, key=lambda k: layout[k].offset)[:2]
    last = max(layout, key=lambda k: layout[k].offset)
    cases = {
        "past the end": (_set_fields(last, offset=size - 4), rf"array '{last}': bytes .* lie outside the packed"),
        "negative offset": (_set_fields(first, offset=-8), rf"array '{first}': bytes -8\.\..* lie outside"),
        "negative length": (_set_fields(first, length=-4), rf"array '{first}': bytes .* lie outside"),
        "dtype not carried": (_set_fields(first, dtype="int64"), rf"array '{first}': dtype 'int64' is not one of"),
        "unknown dtype": (_set_fields(first, dtype="object"), rf"array '{first}': dtype 'object' is not one of"),
        "shape larger than bytes": (
            _set_fields(first, shape=[layout[first].shape[0] + 1, *layout[first].shape[1:]]),
            rf"array '{first}': shape .* does not fill its {layout[first].length} bytes",
        ),
        "negative dimension": (_set_fields(first, shape=[-1, -layout[first].length // 4]),
                               rf"array '{first}': shape \[-1, .* does not fill"),
        "dtype of another size": (_set_fields(first, dtype="float64"), rf"array '{first}': shape .* does not fill"),
        "overlap": (_set_fields(second, offset=layout[second].offset - 4),
                    rf"array '{second}' overlaps array '{first}'"),
        "declared twice": (_duplicate(first), rf"array '{first}' declared twice"),
        "bytes nobody declared": (_drop(first), rf"{layout[first].length} of the packed {size} bytes belong to no array"),
    }
    assert set(cases) == set(CASES)
    edit, message = cases[case]
    with pytest.raises(ProtocolError, match=message):
        RoundOrder.from_wire(arrays, _edit(config, edit), ROUND_ORDER)


def test_the_packed_array_itself_must_be_one_uint8_vector_under_its_key():
    arrays, config = _reply().to_wire(torch.float32)
    packed = arrays[PACKED_KEY]
    for wrong, message in (
        ({PACKED_KEY: packed.view(torch.int8)}, r"array 'packed': torch.int8 .* expected 1-d uint8"),
        ({PACKED_KEY: packed.reshape(2, -1)}, r"array 'packed': .* of shape \(2, .* expected 1-d uint8"),
        ({}, r"expected the one array 'packed', got \[\]"),
        ({PACKED_KEY: packed, "gram/l1": torch.ones(6)}, r"expected the one array 'packed', got \['gram/l1', 'packed'\]"),
        ({PACKED_KEY: packed[:-1]}, r"lie outside the packed"),
    ):
        with pytest.raises(ProtocolError, match=message):
            ClientReply.from_wire(wrong, config, ROUND_REPLY)


def test_a_schema_2_peer_is_refused_naming_both_versions():
    assert SCHEMA_VERSION == 3
    for wire, read in (
        (_order().to_wire(), lambda a, c: RoundOrder.from_wire(a, c, ROUND_ORDER)),
        (_reply().to_wire(torch.float32), lambda a, c: ClientReply.from_wire(a, c, ROUND_REPLY)),
        (NodeCheck(PART, 3).to_wire(), NodeCheck.from_wire),
        (check_order(), lambda a, c: read_manifest(a, c, CHECK_ORDER)),
    ):
        arrays, config = wire
        old = _edit(config, lambda m: setattr(m, "schema_version", 2))
        with pytest.raises(ProtocolError, match=r"schema version 2 not supported \(this side speaks 3\)"):
            read(arrays, old)


def test_a_schema_2_message_with_named_arrays_is_refused_for_its_version_not_its_arrays():
    """What a peer of the previous release sends: one array per tensor and no layout."""
    order = _order()
    arrays, config = order.to_wire()
    named = read_message(arrays, config, ROUND_ORDER)[1]

    def old(m):
        m.schema_version = 2
        for s in m.tensors:
            s.ClearField("offset"), s.ClearField("length")

    with pytest.raises(ProtocolError, match=r"schema version 2 not supported \(this side speaks 3\)"):
        RoundOrder.from_wire(named, _edit(config, old), ROUND_ORDER)
