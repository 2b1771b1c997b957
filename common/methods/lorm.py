"""LoRM (Salami et al., ICLR 2025): alternating closed-form merges of one LoRA factor per round, and RegMean
over the task deltas across tasks.

Rounds go B, A, B, ... (B first: with B = 0, A gets no gradient). Only the trained factor is merged; the other
is shared and frozen, so each merge is the exact least-squares fit of the clients' deltas on their own data:
    B-round (A shared):  B* = (sum_i B_i A G_i A^T) pinv(sum_i A G_i A^T)   clients send A G_i A^T: (r, r)
    A-round (B shared):  A* = (sum_i A_i G_i) pinv(sum_i G_i)               clients send G_i: (d_in,) or dense
At a task end clients send their Grams through W0 + the mean of the task deltas, and the server keeps
S += (B A) G, H += G; the model evaluated is W0 + S pinv(H) (common/merges.py:TaskSums).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from common.layout import Dims, Term
from common.merges import TaskSums, round_terms, solve_layers
from common.methods.base import Adapter, CrossTask, Method, register_method
from common.protocol import ClientReply


@register_method
class LoRM(Method):
    name = "lorm"
    cross_tasks = ("mean",)  # its mean is S H^+, weighted by each task's feature energy
    round_grams = True
    task_end_grams = True

    def schedule(self, rounds: int) -> list[str]:
        return ["B" if r % 2 == 0 else "A" for r in range(rounds)]

    def projects(self, factor: str) -> bool:
        return factor == "B"  # A is shared: A G A^T is all a B-round merge needs of G

    def round_layout(self, factor: str, dims: Dims) -> dict[str, Term]:
        out = {}
        for name in dims.shapes:
            num = (dims.shapes[name][0], dims.rank) if factor == "B" else dims.factor_shape("A", name)
            out[f"num/{name}"] = Term(num, over=f"den/{name}")
            out[f"den/{name}"] = Term(dims.gram(name, projected=self.projects(factor)).shape, gram=True)
        return out

    def backbone_terms(self, factor: str, reply: ClientReply, shared: Adapter) -> dict[str, Tensor]:
        frozen = shared[0] if factor == "B" else shared[1]
        out = {}
        for name, t in reply.trained[factor].items():
            out[f"num/{name}"], out[f"den/{name}"] = round_terms(
                factor, t, frozen[name], reply.grams[name], projected=self.projects(factor)  # type: ignore[arg-type]
            )
        return out

    def merge_backbone(
        self, factor: str, sums: Mapping[str, Tensor], adapter: Adapter, ridge: float
    ) -> tuple[dict[str, dict[str, Tensor]], Adapter | None]:
        layers = [key[len("num/"):] for key in sums if key.startswith("num/")]
        merged = solve_layers({n: sums[f"num/{n}"] for n in layers}, {n: sums[f"den/{n}"] for n in layers}, ridge)
        return {factor: merged}, None

    def end_task(self, adapter: Adapter, cross: CrossTask, grams: Mapping[str, Tensor] | None) -> CrossTask:
        assert grams is not None  # task_end_grams: the schedule always asks
        sums = TaskSums(cross.sums.S, cross.sums.H)  # a copy: the caller's sums stay as they were
        sums.fold(adapter[0], adapter[1], grams)
        return CrossTask(cross.past + [adapter], sums)

    def eval_deltas(self, cross: CrossTask, layers: list[str], ridge: float) -> dict[str, Tensor]:
        return cross.sums.delta(ridge)
