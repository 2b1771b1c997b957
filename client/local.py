"""A client's local work for one message, on the node's cached model and data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Context
from torch import Tensor

from common.config import NodeConfig, RunConfig, resolve_device
from common.data import client_task_indices
from common.experiment import HEAD, Experiment, build_experiment, stable_seed
from common.lora import get_factors, set_deltas, set_factors, set_trainable
from common.merges import delta_sum, project_gram
from common.lorm_manifest_pb2 import GRAMS_ORDER, ROUND_ORDER
from common.protocol import GRAMS, TRAIN, ClientReply, RoundOrder
from common.training import gram_pass, make_loader, train_block


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
        if node.num_threads:
            torch.set_num_threads(node.num_threads)
        device = resolve_device(node.device or run.device)
        exp = build_experiment(run, node.data_dir or run.data_dir, device, node.cache_dir)
        return cls(run=run, node=node, exp=exp)

    @property
    def gram_dtype(self) -> torch.dtype:
        return getattr(torch, self.run.gram_dtype)

    def _indices(self, task: int) -> np.ndarray:
        return client_task_indices(
            self.exp.stream, task, self.node.partition_id, self.node.num_partitions, self.run.beta, self.run.seed
        )

    def _block(self, order: RoundOrder) -> tuple[int, int]:
        """The task's classes; server and client derive them independently, so a mismatch means different data."""
        block = self.exp.block(order.task)
        if block != order.block:
            raise ValueError(
                f"task {order.task}: server says classes {order.block}, this node's data says {block}; "
                "do the server and this SuperNode use the same run config and data?"
            )
        return block

    def _load_adapter(self, order: RoundOrder) -> None:
        model = self.exp.model
        set_factors(model, "A", order.A)
        set_factors(model, "B", order.B)

    def _base(self, order: RoundOrder) -> dict[str, Tensor] | None:
        """What clients train on besides W0 + B A: nothing (LoRM), or the sum of the past deltas (baselines)."""
        if order.past_mode != "sum" or not order.past:
            return None
        return delta_sum(order.past, self.exp.shapes, self.exp.device)

    def _grams(
        self, order: RoundOrder, indices: np.ndarray, with_head: bool
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Grams through the model the merge is about: W0 + mean of the task deltas, the current one included
        (LoRM, as the paper's clients do), or the model the client trained (baselines).

        Returns the Grams and, for the dense ones that saw fewer rows than half their side (so their rank is low
        enough for an exact factor to be smaller than the packed triangle), their shrinkage alpha."""
        model, device = self.exp.model, self.exp.device
        if order.past_mode == "mean":
            deltas, scale = mean_delta_terms(order.past, list(self.exp.shapes), device)
        else:
            deltas, scale = self._base(order), 1.0
        set_deltas(model, deltas, adapter_scale=scale)
        alpha = self.exp.alpha if with_head else {k: v for k, v in self.exp.alpha.items() if k != HEAD}
        loader = make_loader(self.exp.stream.train, indices, self.run.eval_batch_size, shuffle=False, seed=0)
        try:
            grams, rows = gram_pass(model, loader, alpha, passes=self.run.gram_passes, device=device)
        finally:
            set_deltas(model, None, adapter_scale=1.0)
        low_rank = {name: a for name, a in alpha.items() if a > 0 and 2 * rows[name] < self.exp.gram_d_in[name] + 1}
        return grams, low_rank

    def respond(self, kind: str, arrays: dict[str, Tensor], config: dict) -> tuple[dict[str, Tensor], dict]:
        """One order in wire form (Flower message type, arrays, config) -> the reply in wire form."""
        if kind == TRAIN:
            order = RoundOrder.from_wire(arrays, config, ROUND_ORDER)
            reply = self.train_round(order)
            self.last_summary = (
                f"task {order.task} round {order.round} factor {order.factor} on {reply.num_examples} samples, "
                f"loss {reply.train_loss:.4f}"
            )
        elif kind == GRAMS:
            order = RoundOrder.from_wire(arrays, config, GRAMS_ORDER)
            reply = self.task_end_grams(order)
            self.last_summary = f"task {order.task} end: Grams of {reply.num_examples} samples"
        else:
            raise ValueError(f"unknown message type {kind!r}")
        return reply.to_wire(self.gram_dtype)

    def train_round(self, order: RoundOrder) -> ClientReply:
        model, device = self.exp.model, self.exp.device
        if order.factor not in ("A", "B", "AB") or order.head_weight is None:
            raise ValueError(f"a training round needs factors A, B or AB and the head block, got {order.factor!r}")
        self._load_adapter(order)
        lo, hi = self._block(order)
        with torch.no_grad():
            model.head.weight[lo:hi] = order.head_weight.to(device)
            model.head.bias[lo:hi] = order.head_bias.to(device)
        set_deltas(model, self._base(order), adapter_scale=1.0)
        set_trainable(model, order.factor)
        model.head.requires_grad_(True)

        indices = self._indices(order.task)
        loader = make_loader(
            self.exp.stream.train,
            indices,
            self.run.batch_size,
            shuffle=True,
            seed=stable_seed(self.run.seed, order.task, order.round, self.node.partition_id),
        )
        loss = train_block(model, loader, (lo, hi), epochs=self.run.local_epochs, lr=self.run.lr, device=device)
        set_deltas(model, None, adapter_scale=1.0)
        grams, low_rank = self._grams(order, indices, with_head=True) if self.run.method.round_grams else ({}, {})
        projected = frozenset()
        if order.factor == "B" and grams:
            # A B-round merge needs only A G A^T (A is shared): r x r numbers per layer instead of G.
            projected = frozenset(self.exp.shapes)
            grams |= {name: project_gram(order.A[name].to(grams[name]), grams[name]) for name in projected}
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
            projected=projected,
        )

    def task_end_grams(self, order: RoundOrder) -> ClientReply:
        self._block(order)
        self._load_adapter(order)
        indices = self._indices(order.task)
        grams, low_rank = self._grams(order, indices, with_head=False)
        return ClientReply(
            task=order.task, round=order.round, factor="", num_examples=len(indices), grams=grams, low_rank=low_rank
        )
