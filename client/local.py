"""A client's local work for one message, on the node's cached model and data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Context
from torch import Tensor

from common.analytic import feature_sums
from common.config import ConfigError, NodeConfig, RunConfig, resolve_device
from common.data import client_task_indices
from common.data.check import check_images
from common.experiment import Experiment, build_experiment, stable_seed
from common.grams import low_rank_pays
from common.identity import WITHHELD, Partition, partition_samples
from common.layout import CHECK, GRAMS, HEAD_SUMS, TRAIN, ReplySpec
from common.lora import get_factors, set_deltas, set_factors, set_trainable
from common.lorm_manifest_pb2 import CHECK_ORDER, GRAMS_ORDER, ROUND_ORDER
from common.merges import delta_sum, project_gram
from common.model import HEAD
from common.protocol import ClientReply, NodeCheck, RoundOrder, read_manifest
from common.training import gram_pass, head_inputs, make_loader, train_block


def mean_delta_terms(
    past: list[tuple[dict[str, Tensor], dict[str, Tensor]]], layers: list[str], device: str
) -> tuple[dict[str, Tensor] | None, float]:
    """Set-up for W0 + mean_{tau<=t}(B_tau A_tau) where the current adapter is the t-th term.

    Returns (sum over past tasks of B_tau A_tau / (t+1) per layer, scale 1/(t+1) for the live adapter).
    """
    if not past:
        return None, 1.0
    n = len(past) + 1
    return {name: d / n for name, d in delta_sum(past, layers, device).items()}, 1.0 / n


@dataclass
class LocalWork:
    run: RunConfig
    node: NodeConfig
    exp: Experiment
    last_summary: str = ""

    @classmethod
    def from_context(cls, context: Context) -> "LocalWork":
        return cls.create(
            RunConfig.parse(context.run_config, source="run config"),
            NodeConfig.parse(context.node_config, source="node config"),
        )

    @classmethod
    def create(cls, run: RunConfig, node: NodeConfig) -> "LocalWork":
        """This node's work for one message. Its settings and its data are checked first (the partition's image
        files decoded once, see common/data/check.py), so a bad one fails the start-up check, not a round."""
        if run.num_partitions and node.num_partitions != run.num_partitions:
            raise ConfigError(
                f"node config num-partitions {node.num_partitions} differs from the run's num-partitions "
                f"{run.num_partitions}"
            )
        if node.num_threads:
            torch.set_num_threads(node.num_threads)
        device = resolve_device(node.device or run.device, f"{'node' if node.device else 'run'} config device")
        data_dir = node.data_dir or run.data_dir
        exp = build_experiment(run, data_dir, device, node.cache_dir)
        _check_partition_data(exp, data_dir, node.partition_id, node.num_partitions, node.cache_dir)
        return cls(run=run, node=node, exp=exp)

    @property
    def gram_dtype(self) -> torch.dtype:
        return getattr(torch, self.run.gram_dtype)

    def _indices(self, task: int) -> np.ndarray:
        return client_task_indices(
            self.exp.stream, task, self.node.partition_id, self.node.num_partitions, self.run.beta, self.run.seed
        )

    def _partition(self, tasks: range | tuple[int, ...]) -> tuple[Partition, int]:
        """(the partition this node proves, its samples) over ``tasks``; withheld under secure aggregation, where
        the server must not learn which node holds what (hence how many samples)."""
        pid, k = self.node.partition_id, self.node.num_partitions
        if self.run.privacy == "secagg":
            return Partition(WITHHELD, k), 0
        fingerprint, count = partition_samples(self.exp.stream, tasks, pid, k, self.run.beta, self.run.seed)
        return Partition(pid, k, fingerprint), count

    def check(self, arrays: dict[str, Tensor], config: dict) -> NodeCheck:
        """The start-up check's reply: by now this node's data has been checked (``create``); say what it holds."""
        read_manifest(arrays, config, CHECK_ORDER)
        partition, count = self._partition(range(len(self.exp.tasks)))
        self.last_summary = f"start-up check: {partition}, {count or 'withheld'} samples, data checked"
        return NodeCheck(partition, count)

    def _spec(self, kind: str, order: RoundOrder) -> ReplySpec:
        """The reply's layout. The task's classes and the method's past mode are derived by server and client
        independently, so a mismatch means different data or settings."""
        block = self.exp.block(order.task)
        if block != order.block or order.past_mode != self.run.method.past_mode:
            raise ValueError(
                f"task {order.task}: server says classes {order.block} and past mode {order.past_mode!r}, this "
                f"node says {block} and {self.run.method.past_mode!r}; do the server and this SuperNode use the "
                "same run config and data?"
            )
        return self.run.method.reply_spec(kind, order.factor, self.exp.dims, block[1] - block[0])

    def _load_adapter(self, order: RoundOrder) -> None:
        model = self.exp.model
        set_factors(model, "A", order.A)
        set_factors(model, "B", order.B)

    def _base(self, order: RoundOrder) -> dict[str, Tensor] | None:
        """What clients train on besides W0 + B A: nothing (past mode "mean"), or the sum of the past deltas."""
        if order.past_mode != "sum" or not order.past:
            return None
        return delta_sum(order.past, self.exp.shapes, self.exp.device)

    def _grams(self, order: RoundOrder, indices: np.ndarray, spec: ReplySpec) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The Grams ``spec`` asks for, through the model the merge is about: W0 + mean of the task deltas, the
        current one included (past mode "mean", as the paper's clients do), or the model the client trained.

        Returns the Grams (projected where the spec says) and, for the dense ones that saw fewer rows than half
        their side (so their rank is low enough for an exact factor to be smaller than the packed triangle), their
        shrinkage alpha."""
        model, device = self.exp.model, self.exp.device
        if order.past_mode == "mean":
            deltas, scale = mean_delta_terms(order.past, list(self.exp.shapes), device)
        else:
            deltas, scale = self._base(order), 1.0
        set_deltas(model, deltas, adapter_scale=scale)
        alpha = {name: a for name, a in self.exp.alpha.items() if name in spec.grams}
        # Grams of the views the client trains on (fresh ones each pass), as the reference computes them.
        views = self.exp.train_data(stable_seed(self.run.seed, order.task, order.round, self.node.partition_id, 1))
        loader = make_loader(views, indices, self.run.eval_batch_size, shuffle=False, seed=0)
        try:
            grams, rows = gram_pass(
                model, loader, alpha, passes=self.run.gram_passes, device=device, amp=self.run.amp == "bf16"
            )
        finally:
            set_deltas(model, None, adapter_scale=1.0)
        # A is shared in a projecting round: A G A^T (r x r) is all its merge needs of G.
        grams |= {name: project_gram(order.A[name].to(grams[name]), grams[name]) for name in spec.projected}
        # A raw Gram's rank is at most the rows seen: below the break-even, try the exact factor.
        low_rank = {name: a for name, a in alpha.items() if a > 0 and low_rank_pays(rows[name], spec.grams[name].side)}
        return grams, low_rank

    def answer(self, kind: str, arrays: dict[str, Tensor], config: dict) -> tuple[RoundOrder, ReplySpec, ClientReply]:
        """One order in wire form (Flower message type, arrays, config) -> (the order, the reply's layout, this
        node's reply)."""
        if kind == TRAIN:
            order = RoundOrder.from_wire(arrays, config, ROUND_ORDER)
            spec = self._spec(kind, order)
            reply = self.train_round(order, spec)
            self.last_summary = (
                f"task {order.task} round {order.round} factor {order.factor} on {reply.num_examples} samples, "
                f"loss {reply.train_loss:.4f}"
            )
        elif kind == GRAMS:
            order = RoundOrder.from_wire(arrays, config, GRAMS_ORDER)
            spec = self._spec(kind, order)
            reply = self.task_end_grams(order, spec)
            self.last_summary = f"task {order.task} end: Grams of {reply.num_examples} samples"
        elif kind == HEAD_SUMS:
            order = RoundOrder.from_wire(arrays, config, GRAMS_ORDER)
            spec = self._spec(kind, order)
            reply = self.head_sums(order)
            self.last_summary = f"task {order.task} end: head sums of {reply.num_examples} samples"
        else:
            raise ValueError(f"unknown message type {kind!r}")
        return order, spec, reply

    def respond(self, kind: str, arrays: dict[str, Tensor], config: dict) -> tuple[dict[str, Tensor], dict]:
        """One order in wire form -> the reply in wire form (privacy "plain", and the start-up check)."""
        if kind == CHECK:
            return self.check(arrays, config).to_wire()
        return self.answer(kind, arrays, config)[2].to_wire(self.gram_dtype)

    def train_round(self, order: RoundOrder, spec: ReplySpec) -> ClientReply:
        model, device = self.exp.model, self.exp.device
        if order.factor not in ("A", "B", "AB") or order.head_weight is None:
            raise ValueError(f"a training round needs factors A, B or AB and the head block, got {order.factor!r}")
        self._load_adapter(order)
        lo, hi = order.block
        with torch.no_grad():
            model.head.weight[lo:hi] = order.head_weight.to(device)
            model.head.bias[lo:hi] = order.head_bias.to(device)
        set_deltas(model, self._base(order), adapter_scale=1.0)
        set_trainable(model, order.factor)
        model.head.requires_grad_(True)

        indices = self._indices(order.task)
        seed = stable_seed(self.run.seed, order.task, order.round, self.node.partition_id)
        loader = make_loader(self.exp.train_data(seed), indices, self.run.batch_size, shuffle=True, seed=seed)
        loss = train_block(
            model, loader, (lo, hi), epochs=self.run.local_epochs, lr=self.run.lr, device=device,
            amp=self.run.amp == "bf16",
        )
        set_deltas(model, None, adapter_scale=1.0)
        grams, low_rank = self._grams(order, indices, spec) if spec.grams else ({}, {})
        return ClientReply(
            task=order.task,
            round=order.round,
            factor=order.factor,
            num_examples=len(indices),
            grams=grams,
            low_rank=low_rank,
            trained={f: get_factors(model, f) for f in order.factor},
            # Copies: on CPU .cpu() is a view of the live parameters, which the next round trains in place.
            head_weight=model.head.weight[lo:hi].detach().cpu().clone(),
            head_bias=model.head.bias[lo:hi].detach().cpu().clone(),
            train_loss=loss,
            projected=spec.projected,
            partition=self._partition((order.task,))[0],
        )

    def task_end_grams(self, order: RoundOrder, spec: ReplySpec) -> ClientReply:
        self._load_adapter(order)
        indices = self._indices(order.task)
        grams, low_rank = self._grams(order, indices, spec)
        return ClientReply(
            task=order.task, round=order.round, factor="", num_examples=len(indices), grams=grams, low_rank=low_rank,
            partition=self._partition((order.task,))[0],
        )

    def head_sums(self, order: RoundOrder) -> ClientReply:
        """The analytic head's sums over this node's data of the task (common/analytic.py), through W0 alone (no
        delta, the live adapter off): X^T X of the head inputs (d, d) and Y^T X of the task's classes (m, d)."""
        model, (lo, hi) = self.exp.model, order.block
        indices = self._indices(order.task)
        loader = make_loader(self.exp.head_sums_data(order.task), indices, self.run.eval_batch_size, shuffle=False,
                             seed=0)
        set_deltas(model, None, adapter_scale=0.0)
        try:
            x, y = head_inputs(model, loader, device=self.exp.device)
        finally:
            set_deltas(model, None, adapter_scale=1.0)
        G, C = feature_sums(x, y - lo, hi - lo)
        return ClientReply(
            task=order.task, round=order.round, factor="", num_examples=len(indices), grams={HEAD: G},
            # shrinkage 1 is the raw Gram: its exact factor travels when the client has fewer images than half d
            low_rank={HEAD: 1.0} if low_rank_pays(len(indices), G.shape[0]) else {},
            class_sums=C.T, partition=self._partition((order.task,))[0],
        )


_CHECKED: set[tuple] = set()  # (run, data dir, partition-id, num-partitions, cache dir) checked by this process


def _check_partition_data(exp: Experiment, data_dir: str, partition_id: int, num_partitions: int,
                          cache_dir: str) -> None:
    """The partition's image files over every task of the run, decoded once per process (and once per machine for
    the same files, through the stream cache's verdict); DataError naming the bad ones."""
    key = (exp.run, data_dir, partition_id, num_partitions, cache_dir)
    if key in _CHECKED:
        return
    run = exp.run
    indices = np.unique(np.concatenate([
        client_task_indices(exp.stream, t, partition_id, num_partitions, run.beta, run.seed)
        for t in range(len(exp.tasks))
    ]))
    check_images(exp.stream.train, indices, what=f"partition {partition_id}/{num_partitions}", cache_dir=cache_dir)
    _CHECKED.add(key)
