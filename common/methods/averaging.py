"""The averaging baselines: each trained factor averaged over clients, weighted by sample count.

- FedAvg-LoRA: A and B trained and averaged every round.
- FFA-LoRA (Sun et al., 2024): A frozen at its shared random init, only B trained and averaged.
Across tasks (``cross-task``), "mean" (the reference's default): every task trains on W0 and the model evaluated is
W0 + the mean of the task deltas; "chain": every task trains on W0 + the sum of the past deltas, the model is that
sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from common.layout import Dims, Term
from common.methods.base import COUNT_N, Adapter, Method, register_method
from common.protocol import ClientReply


class Averaging(Method):
    trained: ClassVar[str]  # the factors every round trains
    cross_tasks = ("mean", "chain")  # the reference's default is "mean" ("individual_mean" in fed-mammoth)
    round_grams = False

    def schedule(self, rounds: int) -> list[str]:
        return [self.trained] * rounds

    def round_layout(self, factor: str, dims: Dims) -> dict[str, Term]:
        return {f"n{f}/{name}": Term(dims.factor_shape(f, name)) for f in factor for name in dims.shapes}

    def backbone_terms(self, factor: str, reply: ClientReply, shared: Adapter) -> dict[str, Tensor]:
        n = float(reply.num_examples)
        return {f"n{f}/{name}": t.to(torch.float64) * n for f in factor for name, t in reply.trained[f].items()}

    def merge_backbone(
        self, factor: str, sums: Mapping[str, Tensor], adapter: Adapter, ridge: float
    ) -> tuple[dict[str, dict[str, Tensor]], Adapter | None]:
        n = float(sums[COUNT_N].item())
        factors = {f: {key[len(f) + 2:]: t / n for key, t in sums.items() if key.startswith(f"n{f}/")} for f in factor}
        return factors, None


@register_method
class FedAvgLoRA(Averaging):
    name = "fedavg-lora"
    trained = "AB"


@register_method
class FFALoRA(Averaging):
    name = "ffa-lora"
    trained = "B"
