"""What the server and the clients say to each other, as typed objects, and their wire form.

Flower-free on purpose: ``to_wire`` gives (arrays, config) that each side wraps in one ArrayRecord and one
ConfigRecord. The arrays are ONE uint8 tensor under ``PACKED_KEY`` holding every tensor of the message back to
back (Flower moves each array as objects of its own, a request each at every hop: one array instead of hundreds
saves seconds per message); the config holds a versioned protobuf ``Manifest`` (proto/lorm_manifest.proto)
saying where each tensor lies in it and what it is. ``from_wire`` refuses a message whose schema version is
unknown or whose bytes do not match its manifest, so the layout of a message is written once, for both ends.

Message kinds
- ROUND_ORDER (Flower ``train``, one per round): task, round, the factor to train, the shared adapter (A, B),
  the current head block and the past tasks' adapters (clients need them for the Gram model
  W0 + mean_tau(B_tau A_tau)). The ROUND_REPLY carries the trained factor, the head block, every layer's input
  Gram (+ the head's) and the sample count.
- GRAMS_ORDER (Flower ``query.grams``, once per task end): the task's final adapter and the past ones; the
  GRAMS_REPLY carries the backbone layers' Grams through W0 + mean of the task deltas, for the cross-task fold.
- The head-sums query (Flower ``query.head``, once per task end when head = "analytic") travels as a GRAMS_ORDER
  with no arrays (its features are W0's: nothing to send down); its GRAMS_REPLY carries the head input's dense
  Gram X^T X and the class sums Y^T X of the task's classes (``class_sums``), for the server's ridge head.
- CHECK_ORDER (Flower ``query.check``, once when the server starts, before any round): no arrays; the
  CHECK_REPLY says which partition the node holds over every task of the run, once its data has been checked.

Every reply carries the node's partition (common/identity.py), which the server checks before anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import torch
from torch import Tensor

from common.lorm_manifest_pb2 import (
    CHECK_ORDER,
    CHECK_REPLY,
    DENSE_PACKED,
    DIAGONAL,
    GRAMS_ORDER,
    GRAMS_REPLY,
    LOW_RANK,
    PAST_MODE_MEAN,
    PAST_MODE_SUM,
    PROJECTED_PACKED,
    ROUND_ORDER,
    ROUND_REPLY,
    GramSpec,
    Kind,
    Manifest,
    TensorSpec,
)
from common.lorm_manifest_pb2 import Partition as PartitionSpec
from common.grams import low_rank_factor, shrink
from common.identity import Partition
from common.layout import CLASS_SUMS
from common.model import HEAD
from common.wire import flatten, pack_symmetric, unflatten, unpack_symmetric

# 3: every message's tensors packed into one uint8 array, their byte layout in the manifest
# 2: replies carry the node's partition; the start-up check (CHECK_ORDER / CHECK_REPLY)
SCHEMA_VERSION = 3
MANIFEST_KEY = "manifest"
PACKED_KEY = "packed"
# What the messages carry; anything else in a layout is a malformed (or hostile) message.
WIRE_DTYPES = {t: getattr(torch, t) for t in ("float16", "bfloat16", "float32", "float64")}


class ProtocolError(ValueError):
    """A message that does not follow this protocol: unknown version, wrong kind, arrays that break the manifest."""


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def pack_arrays(arrays: dict[str, Tensor]) -> tuple[Tensor, list[TensorSpec]]:
    """Named tensors -> one uint8 tensor, back to back in key order, and each tensor's place in it."""
    chunks, specs, offset = [], [], 0
    for key, t in sorted(arrays.items()):
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        specs.append(TensorSpec(key=key, shape=list(t.shape), dtype=_dtype_name(t), offset=offset, length=raw.numel()))
        chunks.append(raw)
        offset += raw.numel()
    return (torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)), specs


def unpack_arrays(packed: Tensor, specs) -> dict[str, Tensor]:
    """Inverse of :func:`pack_arrays`; a ProtocolError naming the array whose layout is impossible: bytes outside
    the packed array, a dtype the protocol does not carry, a shape that does not fill its bytes, a key twice,
    tensors that overlap, or bytes that belong to no tensor."""
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise ProtocolError(f"array {PACKED_KEY!r}: {packed.dtype} of shape {tuple(packed.shape)}, expected 1-d uint8")
    size, out, spans = packed.numel(), {}, []
    for s in specs:
        where = f"array {s.key!r}"
        if s.key in out:
            raise ProtocolError(f"{where} declared twice")
        if s.dtype not in WIRE_DTYPES:
            raise ProtocolError(f"{where}: dtype {s.dtype!r} is not one of {sorted(WIRE_DTYPES)}")
        if s.offset < 0 or s.length < 0 or s.offset + s.length > size:
            raise ProtocolError(f"{where}: bytes {s.offset}..{s.offset + s.length} lie outside the packed {size} bytes")
        dtype = WIRE_DTYPES[s.dtype]
        if any(d < 0 for d in s.shape) or prod(s.shape) * dtype.itemsize != s.length:
            raise ProtocolError(f"{where}: shape {list(s.shape)} of {s.dtype} does not fill its {s.length} bytes")
        out[s.key] = packed[s.offset:s.offset + s.length].clone().view(dtype).reshape(tuple(s.shape))
        spans.append((s.offset, s.length, s.key))
    spans.sort()
    for (start, length, key), (next_start, _, next_key) in zip(spans, spans[1:]):
        if next_start < start + length:
            raise ProtocolError(f"array {next_key!r} overlaps array {key!r} in the packed bytes")
    if (covered := sum(length for _, length, _ in spans)) != size:
        raise ProtocolError(f"{size - covered} of the packed {size} bytes belong to no array of the manifest")
    return out


def _message(
    kind: int, arrays: dict[str, Tensor], grams: tuple[GramSpec, ...] = (), partition: Partition | None = None,
    **fields,
) -> tuple[dict[str, Tensor], dict[str, bytes]]:
    """A message in wire form: the packed tensors and the manifest describing them."""
    packed, specs = pack_arrays(arrays)
    manifest = Manifest(schema_version=SCHEMA_VERSION, kind=kind, grams=grams, tensors=specs, **fields)
    if partition is not None:
        manifest.partition.CopyFrom(PartitionSpec(
            partition_id=partition.partition_id, num_partitions=partition.num_partitions,
            fingerprint=partition.fingerprint,
        ))
    return {PACKED_KEY: packed}, {MANIFEST_KEY: manifest.SerializeToString()}


def _wire_scale(g: Tensor, dtype: torch.dtype) -> float:
    """max|g| for 16-bit transports (a raw Gram overflows float16's range), else 1."""
    if dtype not in (torch.float16, torch.bfloat16):
        return 1.0
    top = g.abs().max().item() if g.numel() else 0.0
    return top if top > 0 else 1.0


def read_message(arrays: dict[str, Tensor], config: dict, kind: int) -> tuple[Manifest, dict[str, Tensor]]:
    """Parse and check a message's manifest, then unpack its tensors by it; ProtocolError naming the first
    mismatch. The version is checked before anything else, so an older peer learns that it is one."""
    raw = config.get(MANIFEST_KEY)
    if not isinstance(raw, bytes):
        raise ProtocolError("message has no LoRM manifest (is the peer a LoRM app of this project?)")
    manifest = Manifest()
    try:
        manifest.ParseFromString(raw)
    except Exception as err:  # protobuf raises DecodeError; anything else is as bad
        raise ProtocolError(f"unreadable manifest: {err}") from None
    if manifest.schema_version != SCHEMA_VERSION:
        raise ProtocolError(
            f"manifest schema version {manifest.schema_version} not supported (this side speaks {SCHEMA_VERSION})"
        )
    if manifest.kind != kind:
        raise ProtocolError(f"expected a {Kind.Name(kind)} message, got kind {manifest.kind}")
    if set(arrays) != {PACKED_KEY}:
        raise ProtocolError(f"expected the one array {PACKED_KEY!r}, got {sorted(arrays)[:3]}")
    return manifest, unpack_arrays(arrays[PACKED_KEY], manifest.tensors)


def read_manifest(arrays: dict[str, Tensor], config: dict, kind: int) -> Manifest:
    """The manifest of a message, checked as :func:`read_message` does, for messages whose tensors go unread."""
    return read_message(arrays, config, kind)[0]


def read_partition(manifest: Manifest) -> Partition:
    """The partition a reply's manifest proves (ProtocolError when it proves none)."""
    if not manifest.HasField("partition"):
        raise ProtocolError("reply carries no partition (partition-id, num-partitions, fingerprint)")
    p = manifest.partition
    return Partition(p.partition_id, p.num_partitions, bytes(p.fingerprint))


CHECK_REPLY_BYTES = 1 << 16  # a start-up check reply is a manifest without arrays


def check_order() -> tuple[dict[str, Tensor], dict[str, bytes]]:
    """The start-up check's order in wire form: a manifest and an empty packed array."""
    return _message(CHECK_ORDER, {})


@dataclass
class NodeCheck:
    """Client -> server at start-up: the partition the node holds over every task of the run, and its samples
    (0 when withheld), sent once the node has checked its data."""

    partition: Partition
    num_examples: int

    def to_wire(self) -> tuple[dict[str, Tensor], dict[str, bytes]]:
        return _message(CHECK_REPLY, {}, partition=self.partition, num_examples=self.num_examples)

    @classmethod
    def from_wire(cls, arrays: dict[str, Tensor], config: dict) -> "NodeCheck":
        m = read_manifest(arrays, config, CHECK_REPLY)
        return cls(read_partition(m), m.num_examples)


@dataclass
class RoundOrder:
    """Server -> client. ``factor``: the factors to train ("A", "B" or "AB"), "" for the task-end Gram query.

    ``past`` are low-rank adapters (A: (r', d_in), B: (d_out, r')) that clients combine by ``past_mode``:
    "mean" (LoRM: W0 + mean over past and current task deltas, for Grams only) or "sum" (baselines: W0 + sum of
    them is the model they train on).
    """

    task: int
    round: int
    factor: str
    block: tuple[int, int]  # the task's classes: global ids lo..hi-1
    A: dict[str, Tensor]
    B: dict[str, Tensor]
    past: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = field(default_factory=list)
    head_weight: Tensor | None = None  # (hi - lo, d): the task's rows of the head
    head_bias: Tensor | None = None  # (hi - lo,)
    past_mode: str = "mean"

    @property
    def kind(self) -> int:
        return ROUND_ORDER if self.factor else GRAMS_ORDER

    @property
    def where(self) -> str:
        """The step in log lines and errors: "task 2 round 1", or "task 2 end" for a task-end query."""
        return f"task {self.task} round {self.round}" if self.factor else f"task {self.task} end"

    def to_wire(self) -> tuple[dict[str, Tensor], dict[str, bytes]]:
        arrays = flatten("A", self.A, torch.float32) | flatten("B", self.B, torch.float32)
        for tau, (a, b) in enumerate(self.past):
            arrays |= flatten(f"past{tau}.A", a, torch.float32) | flatten(f"past{tau}.B", b, torch.float32)
        if self.head_weight is not None:
            arrays |= flatten(HEAD, {"weight": self.head_weight, "bias": self.head_bias}, torch.float32)
        return _message(
            self.kind, arrays, task=self.task, round=self.round, factor=self.factor, class_lo=self.block[0],
            class_hi=self.block[1], num_past=len(self.past),
            past_mode=PAST_MODE_SUM if self.past_mode == "sum" else PAST_MODE_MEAN,
        )

    @classmethod
    def from_wire(cls, arrays: dict[str, Tensor], config: dict, kind: int) -> "RoundOrder":
        m, arrays = read_message(arrays, config, kind)
        if m.factor not in (("A", "B", "AB") if kind == ROUND_ORDER else ("",)):
            raise ProtocolError(f"factor {m.factor!r} does not fit this message kind")
        head = unflatten(HEAD, arrays)
        past = [(unflatten(f"past{t}.A", arrays), unflatten(f"past{t}.B", arrays)) for t in range(m.num_past)]
        return cls(
            task=m.task,
            round=m.round,
            factor=m.factor,
            block=(m.class_lo, m.class_hi),
            A=unflatten("A", arrays),
            B=unflatten("B", arrays),
            past=past,
            head_weight=head.get("weight"),
            head_bias=head.get("bias"),
            past_mode="sum" if m.past_mode == PAST_MODE_SUM else "mean",
        )


@dataclass
class ClientReply:
    """Client -> server. Grams are float64 here; on the wire diagonal ones go as they are and dense ones as
    packed upper triangles, or, for the layers in ``low_rank`` whose raw Gram has a small enough rank, as an
    exact factor (GramForm LOW_RANK), all in ``gram_dtype``."""

    task: int
    round: int
    factor: str
    num_examples: int
    grams: dict[str, Tensor]  # layer (or HEAD) -> (d_in,) diagonal or (d_in, d_in) dense, or (r, r) projected
    trained: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # factor ("A"/"B") -> layer -> tensor
    head_weight: Tensor | None = None
    head_bias: Tensor | None = None
    train_loss: float = float("nan")
    projected: frozenset[str] = frozenset()  # layers whose Gram is sent as A G A^T (B-rounds)
    gram_wire_dtype: torch.dtype = torch.float64  # how the Grams travelled (bounds their rounding error)
    low_rank: dict[str, float] = field(default_factory=dict)  # layer -> its shrinkage alpha, where worth trying
    partition: Partition | None = None  # the node's partition over the order's task (None only in tests)
    class_sums: Tensor | None = None  # head-sums replies: Y^T X of the task's classes, (m, d), float32 on the wire

    @property
    def kind(self) -> int:
        return ROUND_REPLY if self.factor else GRAMS_REPLY

    def _encode(self, name: str, g: Tensor) -> tuple[int, Tensor, float]:
        """(form, wire tensor before scaling, shrinkage) of one Gram."""
        if name in self.projected:
            return PROJECTED_PACKED, pack_symmetric(g), 0.0
        if g.ndim == 1:
            return DIAGONAL, g, 0.0
        alpha = self.low_rank.get(name, 0.0)
        if alpha > 0 and (factor := low_rank_factor(g, alpha)) is not None:
            return LOW_RANK, factor, alpha
        return DENSE_PACKED, pack_symmetric(g), 0.0

    def to_wire(self, gram_dtype: torch.dtype) -> tuple[dict[str, Tensor], dict[str, bytes]]:
        encoded = {n: self._encode(n, g) for n, g in self.grams.items()}
        scales = {n: _wire_scale(t, gram_dtype) for n, (_, t, _) in encoded.items()}
        arrays = {k: t for f, d in self.trained.items() for k, t in flatten(f"factor.{f}", d, torch.float32).items()}
        arrays |= flatten("gram", {n: t / scales[n] for n, (_, t, _) in encoded.items()}, gram_dtype)
        if self.head_weight is not None:
            arrays |= flatten(HEAD, {"weight": self.head_weight, "bias": self.head_bias}, torch.float32)
        if self.class_sums is not None:
            arrays[CLASS_SUMS] = self.class_sums.to(torch.float32)
        specs = tuple(
            GramSpec(layer=n, form=encoded[n][0], d_in=g.shape[-1], scale=scales[n], shrinkage=encoded[n][2])
            for n, g in sorted(self.grams.items())
        )
        return _message(
            self.kind, arrays, specs, self.partition, task=self.task, round=self.round, factor=self.factor,
            num_examples=self.num_examples, train_loss=self.train_loss,
        )

    @classmethod
    def from_wire(cls, arrays: dict[str, Tensor], config: dict, kind: int) -> "ClientReply":
        m, arrays = read_message(arrays, config, kind)
        wire_grams = unflatten("gram", arrays)
        specs = {s.layer: s for s in m.grams}
        if set(specs) != set(wire_grams):
            raise ProtocolError(f"Gram arrays {sorted(wire_grams)[:3]} do not match Gram specs {sorted(specs)[:3]}")
        grams = {}
        for name, g in wire_grams.items():
            spec = specs[name]
            wire_dtype = g.dtype
            g = g.to(torch.float64) * (spec.scale or 1.0)
            if spec.form in (DENSE_PACKED, PROJECTED_PACKED):
                grams[name] = unpack_symmetric(g, int(spec.d_in))
            elif spec.form == DIAGONAL and g.shape == (spec.d_in,):
                grams[name] = g
            elif spec.form == LOW_RANK and g.ndim == 2 and g.shape[0] == spec.d_in and 0 < spec.shrinkage <= 1:
                grams[name] = shrink(g @ g.T, spec.shrinkage)
            else:
                raise ProtocolError(f"Gram of {name}: form {spec.form} with shape {tuple(g.shape)}, d_in {spec.d_in}")
        head = unflatten(HEAD, arrays)
        return cls(
            task=m.task,
            round=m.round,
            factor=m.factor,
            num_examples=m.num_examples,
            grams=grams,
            trained={f: t for f in "AB" if (t := unflatten(f"factor.{f}", arrays))},
            head_weight=head.get("weight"),
            head_bias=head.get("bias"),
            train_loss=m.train_loss,
            projected=frozenset(s.layer for s in m.grams if s.form == PROJECTED_PACKED),
            gram_wire_dtype=wire_dtype if wire_grams else torch.float64,
            partition=read_partition(m),
            class_sums=arrays.get(CLASS_SUMS),
        )
